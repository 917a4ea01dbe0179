"""The operations endpoint of every long-running process: ``/metrics`` and ``/health`` over HTTP.

Served by :class:`OpsServer` (the standard library's WSGI server on a daemon thread, with
prometheus-client's WSGI app for ``/metrics``), started by the process lifecycle
(:mod:`infra.lifecycle`) before the work begins:

- ``GET /metrics``: Prometheus text format 0.0.4 of :data:`infra.metrics.REGISTRY`.
- ``GET /health``: readiness. ``200`` with ``{"status": "ready", …}`` when every component has
  caught up after its (re)start, else ``503`` with ``"starting"`` (or ``"stopping"`` after
  SIGTERM); ``components`` holds each one's ``ready`` flag and details.
- ``GET /health/live``: liveness, ``200`` while the process answers.

Ports: ``--ops-port`` or ``BACKBEAT_OPS_PORT``; by default each kind of process has its own
(:data:`DEFAULT_PORTS`), and when that one is taken the server binds a free port instead and
logs it. Every process writes its address to ``<data_dir>/run/<process>.ops.json`` so tools
(and tests) find it. ``BACKBEAT_OPS_PORT=off`` serves nothing.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from infra import metrics
from infra.errors import ConfigError

log = logging.getLogger("backbeat.ops")

#: The default ``/metrics`` + ``/health`` port of each kind of process. The HTTP servers (the
#: schema registry, ``backbeat serve``) serve both paths on their own port instead.
DEFAULT_PORTS = {
    "worker": 9460,
    "projection-runner": 9461,
    "archiver": 9462,
    "saga-orchestrator": 9463,
    "saga-participants": 9464,
    "notification-relay": 9465,
}

StartResponse = Callable[..., Any]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("ops %s", format % args)


def health() -> tuple[int, dict[str, Any]]:
    """``(HTTP status, body)`` of ``/health`` from the registered components (see module doc)."""
    obs = metrics.observe_all()
    components = {name: {"ready": o.ready, **dict(o.detail)} for name, o in sorted(obs.items())}
    ready = bool(obs) and all(o.ready for o in obs.values())
    status = "stopping" if _STATE["stopping"] else ("ready" if ready else "starting")
    body = {"status": status, "process": metrics._COMPONENTS.process, "pid": os.getpid(),
            "components": components}  # fmt: skip
    return (200 if status == "ready" else 503), body


_STATE = {"stopping": False}


def mark_stopping() -> None:
    """From now on ``/health`` answers ``503 stopping`` (called on SIGTERM, before the work stops)."""
    _STATE["stopping"] = True


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI application: ``/metrics``, ``/health``, ``/health/live``; 404 otherwise."""
    path = environ.get("PATH_INFO", "/")
    if path == "/metrics":
        return _METRICS(environ, start_response)
    if path in ("/health", "/health/live"):
        status, body = (200, {"status": "alive", "pid": os.getpid()}) if path.endswith("live") else health()
        data = json.dumps(body, default=str).encode()
        phrase = "OK" if status == 200 else "Service Unavailable"
        start_response(f"{status} {phrase}", [("Content-Type", "application/json"),
                                             ("Content-Length", str(len(data)))])  # fmt: skip
        return [data]
    data = b'{"error": "not found: try /metrics, /health, /health/live"}'
    start_response(
        "404 Not Found", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


_METRICS = make_wsgi_app(metrics.REGISTRY)


def port_setting(
    process: str, option: str | None = None, environ: dict[str, str] | None = None
) -> int | None:
    """The port to serve on: ``option`` (``--ops-port``), else ``BACKBEAT_OPS_PORT``, else the
    process kind's default; ``None`` when the value is ``off``.

    Raises:
        infra.errors.ConfigError: not a port number or ``off``.
    """
    env = os.environ if environ is None else environ
    raw = option if option is not None else env.get("BACKBEAT_OPS_PORT", "")
    raw = str(raw).strip().lower()
    if raw in ("off", "none", "-"):
        return None
    if not raw:
        return DEFAULT_PORTS.get(process, 0)
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(f"ops port {raw!r}: give a port number 0..65535 or 'off'") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"ops port {port}: give a port number 0..65535 or 'off'")
    return port


def add_port_argument(parser: Any, process: str) -> None:
    """Add ``--ops-port PORT`` to an ``argparse`` parser of process kind ``process`` (read it
    with :func:`port_setting`)."""
    parser.add_argument(
        "--ops-port",
        default=None,
        metavar="PORT",
        help="port of /metrics and /health (0 = any free port, 'off' = none); default "
        f"BACKBEAT_OPS_PORT, else {DEFAULT_PORTS.get(process, 0)}",
    )


class OpsServer:
    """``/metrics`` and ``/health`` on ``host:port`` in a daemon thread.

    ``fallback``: when ``port`` is taken, bind a free port instead (the default ports); when
    false, a taken port raises :class:`infra.errors.ConfigError`.
    """

    def __init__(self, host: str, port: int, *, fallback: bool = True) -> None:
        self.host = host
        self.requested = port
        self.fallback = fallback
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        assert self._server is not None
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> OpsServer:
        """Bind and serve.

        Raises:
            infra.errors.ConfigError: the port is taken and ``fallback`` is false.
        """
        try:
            self._server = make_server(self.host, self.requested, app, _Server, _QuietHandler)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or not self.fallback or self.requested == 0:
                raise ConfigError(f"cannot serve /metrics on {self.host}:{self.requested}: {exc.strerror}; "
                                  "choose another with --ops-port or BACKBEAT_OPS_PORT") from exc  # fmt: skip
            self._server = make_server(self.host, 0, app, _Server, _QuietHandler)
            log.warning("ops port %d is taken; serving /metrics and /health on %d instead",
                        self.requested, self.port)  # fmt: skip
        self._thread = threading.Thread(target=self._server.serve_forever, name="bb-ops", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def write_address(run_dir: Path, process: str, url: str) -> Path:
    """Write ``{"url", "pid"}`` to ``<run_dir>/<process>.ops.json`` (how tools find the endpoint)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"{process}.ops.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    tmp.replace(path)
    return path


def read_address(run_dir: Path, process: str) -> str | None:
    """The ``/metrics`` base URL a running ``process`` wrote, or ``None``."""
    try:
        return str(json.loads((run_dir / f"{process}.ops.json").read_text())["url"])
    except (OSError, ValueError, KeyError):
        return None


__all__ = [
    "DEFAULT_PORTS",
    "OpsServer",
    "add_port_argument",
    "app",
    "health",
    "mark_stopping",
    "port_setting",
    "read_address",
    "write_address",
]
