"""``python -m sagas.orchestrator_main``: run the saga orchestrator against the configured
broker and event store until SIGTERM/SIGINT (what ``backbeat sagas run`` and
``backbeat sagas simulate`` start as a process)."""

from __future__ import annotations

import argparse
import logging

from infra.settings import Settings
from sagas.eventstore import eventstore_env, open_application
from sagas.orchestrator import Orchestrator
from sagas.runner import ProcessRunner
from sagas.saga import Timing

#: The eventsourcing application name of the orchestrator (its SQLite file / PostgreSQL tables).
APP_NAME = Orchestrator.name


def build_orchestrator(settings: Settings, timing: Timing | None = None) -> Orchestrator:
    """The orchestrator on the configured event store (SQLite under ``data_dir`` by default)."""
    return open_application(lambda: Orchestrator(eventstore_env(settings, APP_NAME), timing=timing))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sagas.orchestrator_main", description=__doc__)
    parser.add_argument("--step-timeout-ms", type=int, default=Timing.step_timeout_ms,
                        help="deadline of each command attempt, ms (default %(default)s)")
    parser.add_argument("--max-attempts", type=int, default=Timing.max_attempts,
                        help="tries of a forward step before the saga compensates (default %(default)s)")
    args = parser.parse_args(argv)  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env()
    app = build_orchestrator(settings, Timing(args.step_timeout_ms, args.max_attempts))
    runner = ProcessRunner(app, settings, name=APP_NAME)
    runner.install_signal_handlers()
    runner.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
