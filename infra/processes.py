"""Start, find and stop the background processes of ``backbeat up`` by pid file.

A pid file records the pid and the command line; :func:`stop` only signals a process whose
``/proc/<pid>/cmdline`` still matches, so a recycled pid is never killed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from infra.errors import InfraError


@dataclass(frozen=True)
class Running:
    """A process started by backbeat: ``name``, ``pid``, ``argv``, ``address`` (host:port)."""

    name: str
    pid: int
    argv: list[str]
    address: str
    log: str


def port_in_use(host: str, port: int) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now (for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_alive(running: Running) -> bool:
    """True when ``running.pid`` is alive and still runs the recorded command."""
    cmd = _cmdline(running.pid)
    if cmd is None:
        return False
    try:  # a zombie child of ours is not alive
        state = Path(f"/proc/{running.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and cmd[: len(running.argv)] == running.argv


def pid_file(run_dir: Path, name: str) -> Path:
    """Where the pid file of ``name`` lives."""
    return run_dir / f"{name}.pid"


def read_running(run_dir: Path, name: str) -> Running | None:
    """The recorded process ``name``, or ``None`` when there is no (readable) pid file."""
    path = pid_file(run_dir, name)
    try:
        data = json.loads(path.read_text())
        return Running(data["name"], int(data["pid"]), list(data["argv"]), data["address"], data["log"])
    except (OSError, ValueError, KeyError):
        return None


def _await_exec(proc: subprocess.Popen[bytes], argv: list[str], timeout_s: float = 5.0) -> None:
    """Wait until ``/proc/<pid>/cmdline`` shows ``argv`` (or the process ended, or ``timeout_s``
    seconds). ``Popen`` returns once the exec has closed the child's close-on-exec pipe, which the
    kernel does before it sets up the new program's arguments: in between, the cmdline reads
    empty, and :func:`is_alive` would call a process that is starting dead (seen under load: a
    supervisor's first liveness check declared its child exited)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        cmd = _cmdline(proc.pid)
        if cmd is not None and cmd[: len(argv)] == argv:
            return
        time.sleep(0.002)


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    run_dir: Path,
    address: str,
    ready: Callable[[], bool],
    timeout_s: float = 30.0,
    env: dict[str, str] | None = None,
) -> Running:
    """Start ``argv`` detached (own session, output to ``<run_dir>/<name>.log``), record its pid
    file, and poll ``ready()`` until it is true or ``timeout_s`` (seconds) passes.

    Raises:
        InfraError: the process exits early or is not ready in time (the log's tail is quoted).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    running = Running(name, proc.pid, list(argv), address, str(log_path))
    _await_exec(proc, running.argv)
    pid_file(run_dir, name).write_text(json.dumps(running.__dict__))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pid_file(run_dir, name).unlink(missing_ok=True)
            raise InfraError(
                f"{name} exited with status {proc.returncode} while starting; "
                f"last lines of {log_path}:\n{tail(log_path)}"
            )
        try:
            if ready():
                return running
        except Exception:  # not ready yet: connection refused, timeouts, ...
            pass
        time.sleep(0.1)
    stop(running)
    pid_file(run_dir, name).unlink(missing_ok=True)
    raise InfraError(
        f"{name} did not answer on {address} within {timeout_s:.0f} s; "
        f"last lines of {log_path}:\n{tail(log_path)}"
    )


def stop(running: Running, timeout_s: float = 10.0) -> bool:
    """SIGTERM the process if it is still the one recorded, SIGKILL after ``timeout_s`` s.
    Returns True when a process was stopped."""
    if not is_alive(running):
        return False
    try:
        os.kill(running.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:  # reap it if it is our child
            os.waitpid(running.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not is_alive(running):
            return True
        time.sleep(0.05)
    try:
        os.kill(running.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a text file ('' when missing)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
