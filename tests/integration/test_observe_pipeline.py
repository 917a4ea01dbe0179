"""An operator's view of a running pipeline: the worker (``backbeat worker``) and the projection
runner (``backbeat project``) as real processes on a broker of their own, the real 30Music file
imported while both are scraped over HTTP, and what the two report checked against each other and
against the file: records in on one side equal records out on the other, lag drains to zero,
dead letters are counted by reason on both, ``backbeat status`` shows both ready, every log line
is JSON, and SIGTERM stops both cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from events.importers.run import import_listens
from events.producer import EventProducer
from infra import services
from infra.processes import free_port
from infra.provision import apply_topics
from infra.settings import Settings
from tests import ops_client
from tests.conftest import LISTENS_30MUSIC, env_for, settings_for, wait_for
from tests.ops_client import Samples, get, total

LISTENS = 86_468  # distinct listens in the file (tests/integration/test_pipeline.py checks it against DuckDB)
INGEST = "agent:listening-ingest"


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def scrape(p: Proc) -> Samples:
    """One scrape of ``p`` (empty while it does not answer)."""
    return ops_client.scrape(p.url, required=False)


def value(samples: Samples, name: str, **labels: str) -> float:
    return ops_client.value(samples, name, **labels) or 0.0


def _start(name: str, argv: list[str], env: dict[str, str], data_dir: Path) -> Proc:
    port = free_port()
    log = data_dir / f"{name}.log"
    proc = subprocess.Popen(
        argv,
        env=env | {"BACKBEAT_OPS_PORT": str(port), "BACKBEAT_LOG_FORMAT": "json"},
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    return Proc(name, proc, port, log)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Proc, Proc]]:
    settings = settings_for(tmp_path_factory.mktemp("observe"), free_port(), free_port())
    services.up(settings)
    procs: list[Proc] = []
    try:
        apply_topics(settings)
        env = env_for(settings) | {"BACKBEAT_INGEST_APP_ID": "observe-test", "BACKBEAT_STREAMS_AGENTS": "ingest"}
        cli = [sys.executable, "-m", "infra.cli"]
        worker = _start("worker", [*cli, "worker"], env, settings.data_dir)
        runner = _start("runner", [*cli, "project", "-p", "listens", "-p", "sessions"], env, settings.data_dir)
        procs += [worker, runner]
        for p in procs:
            wait_for(lambda p=p: get(p.url + "/health/live") or p.proc.poll() is not None, 90,
                     f"{p.name} to serve /health/live")  # fmt: skip
            assert p.proc.poll() is None, p.log.read_text()[-3000:]
        yield settings, worker, runner
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
        services.down(settings)


def test_metrics_while_the_pipeline_runs_reconcile(running):
    settings, worker, runner = running
    seen: list[tuple[float, float]] = []  # (worker records in, runner listens records in) per scrape
    done = threading.Event()

    def scraper() -> None:
        while not done.is_set():
            w, r = scrape(worker), scrape(runner)
            if w and r:
                seen.append((value(w, "backbeat_records_in_total", component=INGEST, topic="playback.listens"),
                             value(r, "backbeat_records_in_total", component="projection:listens",
                                   topic="playback.listens")))  # fmt: skip
            done.wait(0.05)

    thread = threading.Thread(target=scraper, daemon=True)
    thread.start()
    try:
        result = import_listens(settings, LISTENS_30MUSIC, "30music")
        assert result.produced == LISTENS

        last: dict[str, object] = {}

        def settled() -> bool:
            w, r = scrape(worker), scrape(runner)
            last.update(
                worker_in=value(w, "backbeat_records_in_total", component=INGEST, topic="playback.listens"),
                worker_lag=total(w, "backbeat_consumer_lag", component=INGEST),
                runner_in={k: v for k, v in r.items() if k[0] in ("backbeat_records_in_total", "backbeat_consumer_lag")},
            )
            return (
                value(w, "backbeat_records_in_total", component=INGEST, topic="playback.listens") == LISTENS
                and total(w, "backbeat_consumer_lag", component=INGEST) == 0
                and value(r, "backbeat_records_in_total", component="projection:listens",
                          topic="playback.listens") == LISTENS  # fmt: skip
                and total(r, "backbeat_consumer_lag") == 0
            )

        try:
            wait_for(settled, 240, "the worker and the runner to read every listen and drain their lag")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last scrape: {last}") from None
    finally:
        done.set()
        thread.join(10)

    # scraped while the pipeline ran: the counts rose through values between 0 and the end
    assert any(0 < w < LISTENS for w, _ in seen) or any(0 < r < LISTENS for _, r in seen), seen[:5]
    assert [w for w, _ in seen] == sorted(w for w, _ in seen)  # never went back

    w, r = scrape(worker), scrape(runner)
    # every listen became a row; what the worker wrote to the sessions topic is what the runner read
    assert value(r, "backbeat_records_out_total", component="projection:listens", topic="listens") == LISTENS
    sessions_out = value(w, "backbeat_records_out_total", component=INGEST, topic="listening.sessions")
    wait_for(lambda: value(scrape(runner), "backbeat_records_in_total", component="projection:sessions",
                           topic="listening.sessions") == sessions_out > 0, 60,
             "the runner to read every session the worker wrote")  # fmt: skip
    # the import ends with a watermark that closes every session: no user has state left
    assert w[("backbeat_state_entries", (("component", INGEST),))] == 0
    assert value(w, "backbeat_batch_duration_seconds_count", component=INGEST) > 0
    assert value(r, "backbeat_batch_duration_seconds_count", component="projection:listens") > 0
    assert value(w, "backbeat_ready", component=INGEST) == 1


def test_bad_records_are_counted_by_reason_on_both_sides(running):
    settings, worker, runner = running
    before_w = total(scrape(worker), "backbeat_dead_letters_total", component=INGEST, reason="decode_error")
    before_r = total(scrape(runner), "backbeat_dead_letters_total", component="projection:listens",
                     reason="decode_error")  # fmt: skip
    producer = EventProducer(settings)
    producer.produce_raw("playback.listens", [b"not avro", b"\x00\x00\x00\x00\x07junk", b"{}"], [b"u"] * 3)
    producer.flush()
    wait_for(
        lambda: total(scrape(worker), "backbeat_dead_letters_total", component=INGEST, reason="decode_error")
        == before_w + 3
        and total(scrape(runner), "backbeat_dead_letters_total", component="projection:listens",
                  reason="decode_error") == before_r + 3,  # fmt: skip
        60,
        "both to count the three bad records as decode errors",
    )
    w = scrape(worker)
    assert value(w, "backbeat_records_out_total", component=INGEST, topic="playback.listens.dlq") >= 3


def test_status_shows_both_ready_and_logs_are_json(running):
    settings, worker, runner = running
    for p in (worker, runner):
        wait_for(lambda p=p: (get(p.url + "/health") or (0, ""))[0] == 200, 60, f"{p.name} ready")
    shown = subprocess.run(
        [sys.executable, "-m", "infra.cli", "status"], env=env_for(settings) | {"COLUMNS": "250"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    for process, p in (("worker", worker), ("projection-runner", runner)):
        line = next(ln for ln in shown.stdout.splitlines() if f" {process} " in ln)
        assert str(p.proc.pid) in line and p.url in line and "ready" in line, shown.stdout
    for p, process in ((worker, "worker"), (runner, "projection-runner")):
        lines = [ln for ln in p.log.read_text().splitlines() if ln.strip()]
        assert lines, p.name
        docs = [json.loads(ln) for ln in lines]  # every line is one JSON object
        assert {d["process"] for d in docs} == {process}


def test_sigterm_stops_both_cleanly(running):
    _settings, worker, runner = running
    for p in (worker, runner):
        p.proc.send_signal(signal.SIGTERM)
    for p in (worker, runner):
        assert p.proc.wait(120) == 0, p.log.read_text()[-3000:]
        assert get(p.url + "/health/live") is None  # the endpoint is closed
