"""infra.processes: a process spawned is alive to the first liveness check (real processes)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from infra.processes import _cmdline, is_alive, spawn


def test_a_spawned_process_is_alive_at_once(tmp_path: Path) -> None:
    """``spawn`` returns only once the kernel shows the new program's arguments: Popen returns as
    soon as the exec closed the child's close-on-exec pipe, before the arguments are set up, and a
    supervisor's first check then read an empty command line and called its child dead (seen here
    under load, about one spawn in 150; 'backbeat sagas run' then stopped everything)."""
    argv = [sys.executable, "-c", "import time; time.sleep(30)", "bb-test-spawn"]
    for _ in range(60):
        running = spawn("sleeper", argv, run_dir=tmp_path, address="-", ready=lambda: True)
        try:
            assert _cmdline(running.pid)[: len(argv)] == argv  # type: ignore[index]
            assert is_alive(running)
        finally:
            os.kill(running.pid, signal.SIGKILL)
            os.waitpid(running.pid, 0)
    assert not is_alive(running)  # and a dead one is not
