"""A toy long-running process on :func:`infra.lifecycle.run_process`, for the lifecycle tests.

``python -m tests.infra.lifecycle_toy MODE N PORT``: counts to ``N`` (1 ms a step; ``N`` = 0
counts until stopped), ready after 3 steps; MODE ``ok`` returns, ``fail`` raises a
BackbeatError at step N, ``crash`` a RuntimeError; on stop it takes 0.5 s to "finish its batch"
(so a test can see ``/health`` say stopping). Prints ``result <n>`` and exits with
run_process's status.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from infra import metrics
from infra.errors import BackbeatError
from infra.lifecycle import LoopService, run_process
from infra.settings import Settings

log = logging.getLogger("backbeat.toy")


def main() -> int:
    mode, limit, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    stop = threading.Event()
    count = [0]

    def run() -> int:
        while not stop.is_set() and (limit == 0 or count[0] < limit):
            count[0] += 1
            time.sleep(0.001)
            if count[0] == 3:
                log.info("third step", extra={"topic": "toy", "partition": 1, "offset": 2, "event_id": "e-3"})
        if stop.is_set():
            time.sleep(0.5)
        if mode == "fail":
            raise BackbeatError("the toy failed on purpose")
        if mode == "crash":
            raise RuntimeError("unexpected")
        return count[0]

    metrics.register(
        "toy", lambda: metrics.Observation(records_in={"toy": count[0]}, ready=count[0] >= 3, positions={("toy", 0): 5})
    )
    service = LoopService("toy", run, stop.set)
    code = run_process(
        "toy", [service], ops_port=None if port == "off" else int(port), run_dir=Settings.from_env().run_dir
    )
    print(f"result {service.result}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
