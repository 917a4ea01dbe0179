"""``backbeat topics apply``: create the catalogue's missing topics and report drift.

Idempotent: a second run creates nothing. Drift (a partition count or a declared config that
differs on the broker) is reported, never "fixed" by deleting data.
"""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from events.catalog import TopicSpec, load_catalogue
from infra.errors import InfraError
from infra.settings import Settings


@dataclass(frozen=True)
class TopicReport:
    """The outcome for one topic: ``action`` is ``created``, ``ok`` or ``drift``."""

    name: str
    action: str
    detail: str = ""


def admin_client(settings: Settings) -> AdminClient:
    """A confluent-kafka admin client for ``settings``."""
    return AdminClient(settings.kafka_common())


def apply_topics(settings: Settings, specs: list[TopicSpec] | None = None) -> list[TopicReport]:
    """Create missing topics of ``specs`` (default: the whole catalogue); report drift of others.

    Raises:
        InfraError: the broker cannot be reached or refuses to create a topic.
    """
    specs = list(load_catalogue().values()) if specs is None else specs
    admin = admin_client(settings)
    try:
        metadata = admin.list_topics(timeout=10)
    except Exception as exc:
        raise InfraError(
            f"cannot reach Kafka at {settings.bootstrap_servers} ({exc}); run 'backbeat up' "
            "or set BACKBEAT_BOOTSTRAP_SERVERS"
        ) from exc
    existing = metadata.topics
    reports: list[TopicReport] = []
    missing = [s for s in specs if s.name not in existing]
    if missing:
        futures = admin.create_topics(
            [NewTopic(s.name, s.partitions, 1, config=s.configs()) for s in missing],
            request_timeout=15,
        )
        for name, future in futures.items():
            try:
                future.result(timeout=20)
            except Exception as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise InfraError(f"creating topic {name} failed: {exc}") from exc
            reports.append(TopicReport(name, "created"))
    present = [s for s in specs if s.name in existing]
    if present:
        resources = [ConfigResource("topic", s.name) for s in present]
        configs = {}
        for resource, future in admin.describe_configs(resources).items():
            try:
                configs[resource.name] = {k: v.value for k, v in future.result(timeout=10).items()}
            except Exception:
                configs[resource.name] = {}
        for spec in present:
            problems = []
            partitions = len(existing[spec.name].partitions)
            if partitions != spec.partitions:
                problems.append(f"partitions {partitions} on the broker, {spec.partitions} declared")
            actual = configs.get(spec.name, {})
            for key, want in spec.configs().items():
                # Tansu lists only configs a topic was created with (docs/broker.md §12)
                if key in actual and actual[key] != want:
                    problems.append(f"{key}={actual[key]} on the broker, {want} declared")
            reports.append(
                TopicReport(spec.name, "drift" if problems else "ok", "; ".join(problems))
            )
    return sorted(reports, key=lambda r: r.name)
