"""``backbeat up`` / ``down`` / ``status``: the embedded broker and schema registry as
background processes, recorded by pid file under ``<data_dir>/run``."""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

from infra.broker import start_tansu
from infra.errors import InfraError
from infra.processes import Running, is_alive, pid_file, port_in_use, read_running, spawn, stop
from infra.settings import Settings

BROKER = "broker"
REGISTRY = "registry"
ARCHIVER = "archiver"


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return (host or "127.0.0.1").strip("[]"), int(port or default_port)


def registry_answers(url: str) -> bool:
    """True when ``GET <url>/subjects`` answers 200."""
    with urllib.request.urlopen(f"{url}/subjects", timeout=1.0) as resp:
        return resp.status == 200


def start_registry(settings: Settings, timeout_s: float = 30.0) -> Running:
    """Start backbeat's embedded schema registry (:mod:`events.registry_server`) on the host and
    port of ``settings.registry_url``, storing schemas in the ``_schemas`` topic of
    ``settings.bootstrap_servers``; wait until it answers.

    Raises:
        InfraError: the port is taken or it does not start in time.
    """
    url = urlparse(settings.registry_url)
    host, port = url.hostname or "127.0.0.1", url.port or 8081
    if port_in_use(host, port):
        raise InfraError(
            f"port {host}:{port} is already in use, so the embedded schema registry cannot start "
            "there; stop what uses it or set BACKBEAT_REGISTRY_URL to another port"
        )
    argv = [
        sys.executable,
        "-m",
        "events.registry_server",
        "--host",
        host,
        "--port",
        str(port),
        "--bootstrap-servers",
        settings.bootstrap_servers,
    ]
    return spawn(
        REGISTRY,
        argv,
        run_dir=settings.run_dir,
        address=f"{host}:{port}",
        ready=lambda: registry_answers(settings.registry_url),
        timeout_s=timeout_s,
    )


def start_archiver(settings: Settings, timeout_s: float = 30.0) -> Running:
    """Start the continuous archiver (``python -m projections.archive``, :mod:`projections.archive`)
    in the background with the ``BACKBEAT_*`` settings of ``settings``; it counts as started once
    its ops endpoint answers ``/health/live`` (its address is in ``<run_dir>/archiver.ops.json``,
    :mod:`infra.ops`), or, with ``BACKBEAT_OPS_PORT=off``, once it has stayed up for a second.

    Raises:
        InfraError: it exits at once (the log's tail is quoted).
    """
    from infra import ops
    from projections.archive import PROCESS, archive_root

    argv = [sys.executable, "-m", "projections.archive"]
    began = time.monotonic()
    (settings.run_dir / f"{PROCESS}.ops.json").unlink(missing_ok=True)  # a killed run's
    serving = ops.port_setting(PROCESS) is not None

    def ready() -> bool:
        if not serving:
            return time.monotonic() - began >= 1.0
        url = ops.read_address(settings.run_dir, PROCESS)
        if url is None:
            return False
        with urllib.request.urlopen(f"{url}/health/live", timeout=1.0) as resp:
            return resp.status == 200

    return spawn(
        ARCHIVER,
        argv,
        run_dir=settings.run_dir,
        address=str(archive_root(settings)),
        ready=ready,
        timeout_s=timeout_s,
        env={**os.environ, **settings.to_env()},
    )


def _restore_archive(settings: Settings, report: Callable[[str], None] | None) -> None:
    """Restore the archive (if any) into the broker just started empty."""
    from projections.archive import archive_root, archived_topics
    from projections.restore import restore

    if not archived_topics(settings):
        return
    stats = restore(settings)
    if report is not None:
        topics = ", ".join(f"{t} {n:,}" for t, n in stats.per_topic.items() if n)
        report(
            f"restored {stats.records:,} records from {archive_root(settings)} in {stats.seconds:.1f} s"
            f" ({topics or 'nothing archived'}); {stats.rebound} projection offset rows rebound"
        )


@dataclass(frozen=True)
class ProcessHealth:
    """One running process's ops endpoint, as ``backbeat status`` shows it: ``process`` (its
    kind, e.g. ``worker``), ``pid``, ``url`` (of ``/metrics`` and ``/health``), ``status``
    (``ready``, ``starting``, ``stopping``, or ``unreachable``) and the components not ready."""

    process: str
    pid: int | None
    url: str
    status: str
    waiting: tuple[str, ...]


def process_health(settings: Settings, timeout_s: float = 2.0) -> list[ProcessHealth]:
    """Every process that wrote ``<run_dir>/<process>.ops.json`` (:mod:`infra.ops`), with what its
    ``/health`` answers now; files of processes that are gone are removed."""
    import json
    import urllib.error

    out: list[ProcessHealth] = []
    if not settings.run_dir.is_dir():
        return out
    for path in sorted(settings.run_dir.glob("*.ops.json")):
        process = path.name.removesuffix(".ops.json")
        try:
            doc = json.loads(path.read_text())
            url, pid = str(doc["url"]), int(doc["pid"])
        except (OSError, ValueError, KeyError):
            continue
        if not _pid_alive(pid):
            path.unlink(missing_ok=True)
            continue
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        except (OSError, ValueError):
            out.append(ProcessHealth(process, pid, url, "unreachable", ()))
            continue
        waiting = tuple(n for n, c in body.get("components", {}).items() if not c.get("ready"))
        out.append(ProcessHealth(process, pid, url, str(body.get("status", "?")), waiting))
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class ServiceStatus:
    """What ``status`` reports for one service."""

    name: str
    address: str
    state: str  # "running", "stopped", "stale pid file", "external"
    pid: int | None
    log: str | None


def up(
    settings: Settings, archive: bool = False, report: Callable[[str], None] | None = None
) -> list[Running]:
    """Start the broker (when the bootstrap servers are loopback and nothing answers there) and
    the registry, each only if not already running. Returns what this call started.

    With ``archive`` (what ``backbeat up`` does) and the embedded broker: when this call started
    the broker (so it is empty) and ``<lake>/archive`` holds an archive, the archive is restored
    into it first (:func:`projections.restore.restore`, before the registry starts so that it
    reads the restored ``_schemas``; ``report`` gets a one-line summary), and the continuous
    archiver (:mod:`projections.archive`) is started as a background process too.

    Raises:
        InfraError: a port is taken by something else, the binary is missing, a start fails,
            or the restore is refused (:class:`projections.restore.RestoreError`).
    """
    started: list[Running] = []
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    archiving = archive and settings.embedded
    for name in (BROKER, REGISTRY, ARCHIVER):
        if name == ARCHIVER and not archiving:
            continue
        current = read_running(settings.run_dir, name)
        if current is not None and is_alive(current):
            continue
        pid_file(settings.run_dir, name).unlink(missing_ok=True)
        try:
            if name == BROKER:
                if not settings.embedded:
                    continue  # a real cluster: nothing to start
                host, port = _host_port(settings.bootstrap_servers.split(",")[0], 9092)
                started.append(start_tansu(host, port, settings.run_dir))
                if archiving:
                    _restore_archive(settings, report)
            elif name == REGISTRY:
                started.append(start_registry(settings))
            else:
                started.append(start_archiver(settings))
        except InfraError:
            for running in reversed(started):
                stop(running)
                pid_file(settings.run_dir, running.name).unlink(missing_ok=True)
            raise
    return started


def down(settings: Settings) -> list[str]:
    """Stop what ``up`` started (by recorded pid, nothing else). Returns the names stopped."""
    stopped: list[str] = []
    for name in (ARCHIVER, REGISTRY, BROKER):
        current = read_running(settings.run_dir, name)
        if current is None:
            continue
        if stop(current):
            stopped.append(name)
        pid_file(settings.run_dir, name).unlink(missing_ok=True)
    return stopped


def status(settings: Settings) -> list[ServiceStatus]:
    """The state of the broker and the registry (and of the archiver when it has a pid file) as
    recorded under ``run_dir``."""
    out: list[ServiceStatus] = []
    for name, address in (
        (BROKER, settings.bootstrap_servers),
        (REGISTRY, settings.registry_url),
        (ARCHIVER, str(settings.lake_dir / "archive")),
    ):
        current = read_running(settings.run_dir, name)
        if name == ARCHIVER and current is None:
            continue  # only 'backbeat up' starts it: not listed when it never ran
        if current is None and name == BROKER and not settings.embedded:
            out.append(ServiceStatus(name, address, "external (not managed by backbeat)", None, None))
        elif current is None:
            out.append(ServiceStatus(name, address, "stopped", None, None))
        elif is_alive(current):
            out.append(ServiceStatus(name, current.address, "running", current.pid, current.log))
        else:
            out.append(ServiceStatus(name, current.address, "stale pid file", current.pid, None))
    return out
