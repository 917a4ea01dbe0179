"""``backbeat serve`` as a real subprocess on a free port, queried with a real HTTP client (httpx2).

The read models are real: a slice of the Spotify catalog and of the 30Music listens imported into
the session broker and projected by the runners (``tracks``, ``recommendations``), user feature
events projected into the feature store, and saga rows written by the sagas read model's own write
path. Checks each endpoint's content, problem details for 404/400/422/503, OpenAPI, /health,
/metrics, and that reads succeed while a writer holds the file between transactions.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx2 as httpx
import pytest

from events.catalog import TopicSpec
from events.importers.run import import_catalog, import_listens
from events.producer import EventProducer
from infra.processes import free_port
from infra.provision import apply_topics
from infra.resources import open_data
from infra.settings import REPO_ROOT, Settings
from projections.recommendations import RECOMMENDATIONS, RecommendationsWriter
from projections.runner import ProjectionRunner, run_projections
from projections.sql import query
from projections.store import WriterSession, writer
from sagas.readmodel import COLUMNS, DDL, write_sagas
from tests.conftest import CATALOG, LISTENS_30MUSIC, env_for, wait_for
from tests.projections.test_feature_store_unit import HOUR, T0, user_event

pytestmark = pytest.mark.integration

CATALOG_ROWS = 800
LISTEN_ROWS = 3000
SAGA_ID = str(uuid.UUID(int=16))


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _head(src: str, rows: int, dest: Path) -> Path:
    with open_data(src) as f:
        dest.write_bytes(b"".join(line for _, line in zip(range(rows + 1), f, strict=False)))
    return dest


def _saga_rows() -> list[tuple]:
    t = datetime(2026, 1, 2, 3, 4, 5)
    row = (SAGA_ID, "order", "COMPLETED", "order-16", "u1", "pay-16", 2500, "EUR", None,
           t, t, datetime(2026, 1, 2, 3, 4, 6), 1000, 0, 2)  # fmt: skip
    events = [
        (SAGA_ID, 1, "Started", t, "reserve", '{"step": "reserve"}'),
        (SAGA_ID, 2, "Completed", t, None, '{"sent": ["OrderConfirmed"]}'),
    ]
    return [(row, events, [(SAGA_ID, "order-16", "sku-003", 2)])]


@dataclass
class Server:
    settings: Settings
    url: str
    proc: subprocess.Popen
    user: str  # a user with a recommendations list
    track: dict  # one catalog row as imported (a tracks row)


def _serve(settings: Settings, port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "infra.cli", "serve", "--port", str(port), "--read-timeout", "3"],
        env=env_for(settings),
        cwd=REPO_ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def _stop(proc: subprocess.Popen, log: Path) -> None:
    """SIGTERM, then a clean stop (the one lifecycle: uvicorn finishes its requests, exit 0), no
    traceback."""
    proc.terminate()
    assert proc.wait(15) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def server(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("api")
    settings = dataclasses.replace(stack, data_dir=tmp / "data")
    topics = {n: _name(f"api.{n}") for n in ("tracks", "listens", "user_features", "exp", "lists")}
    apply_topics(settings, [TopicSpec(t, 3) for t in topics.values()])
    import_catalog(settings, _head(CATALOG, CATALOG_ROWS, tmp / "catalog.csv"), topic=topics["tracks"])
    import_listens(settings, _head(LISTENS_30MUSIC, LISTEN_ROWS, tmp / "listens.tsv"), "30music",
                   topic=topics["listens"])  # fmt: skip
    producer = EventProducer(settings)
    events = [user_event("u1", T0 + i * HOUR) for i in range(3)] + [user_event("u2", T0)]
    producer.send_many(topics["user_features"], "UserFeaturesComputed", events, key_field="user_id",
                       time_field="occurred_at", source="/tests")  # fmt: skip
    producer.flush()
    run_projections(settings, ["tracks", "user_features"], until_caught_up=True,
                    topics={"tracks": topics["tracks"], "user_features": topics["user_features"]})  # fmt: skip
    write = RecommendationsWriter(settings, experiments_topic=topics["exp"], recommendations_topic=topics["lists"])
    ProjectionRunner(settings, [RECOMMENDATIONS.on_topic(topics["listens"])], write=write).run(until_caught_up=True)
    with writer(settings.duckdb_path) as con:
        con.execute(DDL)
        write_sagas(con, {n: n for n in COLUMNS}, _saga_rows())
    user = query(settings, 'SELECT user_id FROM recommendations GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1').rows[0][0]
    track = query(settings, "SELECT track_id, name, artist, popularity FROM tracks ORDER BY popularity DESC LIMIT 1")
    port = free_port()
    log = tmp / "serve.log"
    proc = _serve(settings, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url) or proc.poll() is not None, 30, "backbeat serve to answer /health")
        assert proc.poll() is None, log.read_text()
        yield Server(settings, url, proc, user, dict(zip(track.columns, track.rows[0], strict=True)))
    finally:
        _stop(proc, log)


def _get(server: Server, path: str, **params: object) -> httpx.Response:
    return httpx.get(server.url + path, params=params or None, timeout=10)


def _assert_problem(r: httpx.Response, status: int, path: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status
    assert body["type"].startswith("urn:backbeat:problem:")
    assert body["title"] and body["detail"]
    assert body["instance"].startswith(path)
    return body


# -- happy paths -----------------------------------------------------------------------------------
def test_recommendations_equal_the_cli_read_function(server: Server):
    from projections.recommendations import read_recommendations

    r = _get(server, f"/users/{server.user}/recommendations", n=5)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = read_recommendations(server.settings, server.user, 5)
    assert body["user_id"] == server.user
    assert body["variant"] == expected.variant and body["model"] == expected.model
    assert [i["track_id"] for i in body["items"]] == [i.track_id for i in expected.items]
    assert [i["rank"] for i in body["items"]] == list(range(1, len(expected.items) + 1))
    assert 1 <= len(body["items"]) <= 5


def test_features_latest_and_as_of(server: Server):
    r = _get(server, "/users/u1/features")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user_id"] == "u1" and body["as_of"] is None
    latest = user_event("u1", T0 + 2 * HOUR)
    assert [f["plays"] for f in body["features"]] == [latest["plays"]]
    assert body["features"][0]["window_end"].endswith("Z")
    assert body["features"][0]["top_artists"][0]["artist_id"] == latest["top_artists"][0]["artist_id"]
    first = user_event("u1", T0)
    r = _get(server, "/users/u1/features", as_of="2014-04-20T09:00:00Z")  # T0 + 1 h: the first window's end
    assert r.status_code == 200, r.text
    assert [f["plays"] for f in r.json()["features"]] == [first["plays"]]


def test_track_by_id(server: Server):
    r = _get(server, f"/tracks/{server.track['track_id']}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert {k: body[k] for k in server.track} == server.track
    assert body["published_at"].endswith("Z") and isinstance(body["tempo_bpm"], float)


def test_search_finds_a_track_by_name_and_artist_first(server: Server):
    words = f"{server.track['name']} {server.track['artist']}"
    r = _get(server, "/tracks/search", q=words, limit=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == words and body["tokens"]
    assert body["items"][0]["track_id"] == server.track["track_id"]
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    artist = _get(server, "/tracks/search", q=server.track["artist"].upper(), limit=100).json()["items"]
    assert artist and all(
        all(w in f"{i['name']} {i['artist']} {i['album_name']}".lower() for w in server.track["artist"].lower().split())
        for i in artist
    )
    assert _get(server, "/tracks/search", q="zzqqxxnotaword").json()["items"] == []


def test_saga_by_id_and_by_business_id(server: Server):
    r = _get(server, f"/sagas/{SAGA_ID}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["saga"]["state"] == "COMPLETED" and body["saga"]["amount_minor"] == 2500
    assert body["saga"]["duration_ms"] == 1000 and body["saga"]["requested_at"] == "2026-01-02T03:04:05Z"
    assert [e["event"] for e in body["events"]] == ["Started", "Completed"]
    assert body["events"][1]["detail"] == {"sent": ["OrderConfirmed"]}
    assert body["order_lines"] == [{"order_id": "order-16", "sku": "sku-003", "quantity": 2}]
    assert _get(server, "/sagas/order-16").json()["saga"]["saga_id"] == SAGA_ID


# -- problem details -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path, slug",
    [
        ("/users/no-such-user/recommendations", "unknown-user"),
        ("/users/no-such-user/features", "unknown-user"),
        ("/tracks/no-such-track", "unknown-track"),
        ("/sagas/no-such-saga", "unknown-saga"),
        ("/no/such/route", "not-found"),
    ],
)
def test_unknown_ids_are_404_problems(server: Server, path: str, slug: str):
    body = _assert_problem(_get(server, path), 404, path)
    assert body["type"] == f"urn:backbeat:problem:{slug}"


def test_bad_input_is_400_or_422_problems(server: Server):
    body = _assert_problem(_get(server, "/users/u1/features", as_of="yesterday"), 400, "/users/u1/features")
    assert body["type"].endswith("bad-time") and "yesterday" in body["detail"]
    body = _assert_problem(_get(server, f"/users/{server.user}/recommendations", n=0), 422, "/users/")
    assert body["errors"][0]["loc"] == ["query", "n"]
    _assert_problem(_get(server, "/tracks/search"), 422, "/tracks/search")  # q missing
    _assert_problem(_get(server, "/tracks/search", q="x", limit="many"), 422, "/tracks/search")


def test_no_duckdb_file_is_503_and_health_says_absent(server: Server, tmp_path: Path):
    settings = dataclasses.replace(server.settings, data_dir=tmp_path / "empty")
    port = free_port()
    proc = _serve(settings, port, tmp_path / "serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url) or proc.poll() is not None, 30, "the second server")
        body = httpx.get(url + "/health").json()
        assert (body["status"], body["components"]["api"]) == ("ready", {"ready": True, "duckdb": "absent"})
        for path in ("/tracks/x", "/users/u1/recommendations", "/users/u1/features", "/sagas/x"):
            r = httpx.get(url + path)
            body = _assert_problem(r, 503, path)
            assert body["type"].endswith("read-model-missing") and r.headers["retry-after"] == "2"
    finally:
        _stop(proc, tmp_path / "serve.log")


# -- operations ------------------------------------------------------------------------------------
def test_openapi_and_docs(server: Server):
    spec = _get(server, "/openapi.json").json()
    assert {
        "/users/{user_id}/recommendations", "/users/{user_id}/features", "/tracks/{track_id}",
        "/tracks/search", "/sagas/{saga_id}", "/health", "/metrics",
    } <= set(spec["paths"])  # fmt: skip
    docs = _get(server, "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_health(server: Server):
    body = _get(server, "/health").json()
    assert body["status"] == "ready" and body["process"] == "api" and body["pid"] == server.proc.pid
    assert body["components"] == {"api": {"ready": True, "duckdb": "present"}}
    assert _get(server, "/health/live").json()["status"] == "alive"


def test_metrics_count_requests_per_route(server: Server):
    for _ in range(3):
        _get(server, "/tracks/no-such-track")
    text = _get(server, "/metrics").text
    line = next(
        ln for ln in text.splitlines()
        if ln.startswith("backbeat_http_requests_total{") and 'route="/tracks/{track_id}"' in ln and 'status="404"' in ln
    )  # fmt: skip
    assert float(line.rsplit(" ", 1)[1]) >= 3
    assert 'backbeat_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/tracks/{track_id}"}' in text
    assert 'backbeat_up{process="api"} 1.0' in text and "process_resident_memory_bytes" in text


def test_reads_succeed_while_a_writer_writes(server: Server):
    """A writer session (the runner's own, :class:`WriterSession`) commits transaction after
    transaction; every request in the meantime answers 200 and the writer keeps going."""
    stop = threading.Event()
    commits = [0]

    def write() -> None:
        with WriterSession(server.settings.duckdb_path) as session:
            with session.connection() as con:
                con.execute("CREATE TABLE IF NOT EXISTS api_write_probe (i BIGINT)")
            while not stop.is_set():
                with session.connection() as con:
                    con.execute("BEGIN")
                    con.execute("INSERT INTO api_write_probe SELECT range FROM range(2000)")
                    con.execute("COMMIT")
                commits[0] += 1
                time.sleep(0.001)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        wait_for(lambda: commits[0] >= 3, 30, "the writer's first commits")
        before = commits[0]
        paths = [f"/tracks/{server.track['track_id']}", "/users/u1/features", f"/sagas/{SAGA_ID}",
                 f"/users/{server.user}/recommendations", "/tracks/search?q=love"]  # fmt: skip
        statuses = [httpx.get(server.url + p, timeout=15).status_code for p in paths * 6]
        wait_for(lambda: commits[0] > before + 3, 30, "the writer to go on after the reads")
    finally:
        stop.set()
        thread.join(30)
    assert statuses == [200] * len(statuses)


def test_a_taken_port_exits_1_saying_why(server: Server, tmp_path: Path):
    """The API runs under the one lifecycle: uvicorn's bind error is logged and the process exits
    with status 1 (no traceback), like any other process whose work cannot start."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = _serve(server.settings, taken.getsockname()[1], tmp_path / "taken.log")
        assert proc.wait(60) == 1
    text = (tmp_path / "taken.log").read_text()
    assert "address already in use" in text and "api exited with status 3" in text
    assert "Traceback" not in text
