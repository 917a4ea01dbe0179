"""`backbeat topics apply` against the real broker: creates what is missing, idempotent,
reports drift without changing anything."""

from __future__ import annotations

from confluent_kafka.admin import AdminClient, NewTopic

from events.catalog import TopicSpec
from infra.provision import apply_topics


def test_apply_creates_then_is_idempotent(stack, unique):
    specs = [TopicSpec(unique("prov.a"), 3, "compact"), TopicSpec(unique("prov.b"), 2)]
    first = apply_topics(stack, specs)
    assert {r.name: r.action for r in first} == {specs[0].name: "created", specs[1].name: "created"}
    second = apply_topics(stack, specs)
    assert {r.action for r in second} == {"ok"}
    meta = AdminClient({"bootstrap.servers": stack.bootstrap_servers}).list_topics(timeout=10)
    assert len(meta.topics[specs[0].name].partitions) == 3
    assert len(meta.topics[specs[1].name].partitions) == 2


def test_drift_is_reported_not_fixed(stack, unique):
    name = unique("prov.drift")
    admin = AdminClient({"bootstrap.servers": stack.bootstrap_servers})
    admin.create_topics([NewTopic(name, 2, 1, config={"cleanup.policy": "delete"})])[name].result(10)
    [report] = apply_topics(stack, [TopicSpec(name, 4, "compact")])
    assert report.action == "drift"
    assert "partitions 2 on the broker, 4 declared" in report.detail
    assert "cleanup.policy=delete on the broker, compact declared" in report.detail
    meta = admin.list_topics(timeout=10)
    assert len(meta.topics[name].partitions) == 2  # untouched


def test_whole_catalogue_applies(stack):
    reports = apply_topics(stack)
    assert {"playback.listens", "listening.sessions", "catalog.tracks"} <= {r.name for r in reports}
    assert all(r.action in {"created", "ok"} for r in reports), reports
