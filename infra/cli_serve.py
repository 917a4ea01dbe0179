"""``backbeat serve``: the HTTP API over the read models (registered by :mod:`infra.cli`).

A thin shell over :func:`infra.api.create_app`, served by uvicorn on a thread of the one process
lifecycle (:func:`infra.lifecycle.run_process`, process ``api``): SIGTERM and Ctrl-C stop it
cleanly (requests in flight finish first); uvicorn's lines go through the one logging setup
(:mod:`infra.logs`, ``BACKBEAT_LOG_FORMAT=json`` for JSON lines). The API serves its own
``/metrics`` and ``/health``, so no separate ops port is opened.
"""

from __future__ import annotations

from typing import Annotated

import typer

#: The process name (metrics, logs, ``/health``).
PROCESS = "api"


def serve(
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port to listen on.")] = 8000,
    read_timeout: Annotated[
        float,
        typer.Option(
            "--read-timeout", min=0.1, help="Seconds a read waits for a runner's batch before answering 503."
        ),
    ] = 10.0,
) -> None:
    """Serve the read models over HTTP (FastAPI), while the runners write.

    GET /users/{id}/recommendations, /users/{id}/features, /tracks/{id}, /tracks/search?q=,
    /sagas/{id}; /health and /metrics (Prometheus); OpenAPI at /openapi.json, docs at /docs.
    Errors are RFC 9457 problem details. Reads BACKBEAT_DATA_DIR's DuckDB file, opened
    read-only per request; stop with Ctrl-C or SIGTERM."""
    import uvicorn

    from infra import logs, metrics
    from infra.api import create_app
    from infra.console import err_console
    from infra.lifecycle import LoopService, run_process
    from infra.settings import get_settings

    settings = get_settings()
    logs.set_process(PROCESS)
    metrics.set_process(PROCESS)
    # log_config=None: the process's one logging setup (applied by run_process) renders uvicorn's
    # lines; on the loop's thread uvicorn installs no signal handlers: mode's worker owns them
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, read_timeout_s=read_timeout), host=host, port=port,
            log_config=None, log_level="warning",
        )
    )  # fmt: skip

    def stop() -> None:
        server.should_exit = True  # uvicorn stops accepting and lets requests in flight finish

    err_console.print(f"serving {settings.duckdb_path} on http://{host}:{port} (docs: /docs)")
    code = run_process(PROCESS, [LoopService(PROCESS, server.run, stop)], ops_port=None)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``backbeat serve`` to the ``backbeat`` app."""
    app.command("serve")(serve)
