"""The embedded schema registry as a long-running process: one logging setup (JSON lines naming the
process with BACKBEAT_LOG_FORMAT=json), ``/metrics`` and ``/health`` on its own port."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from prometheus_client.parser import text_string_to_metric_families

from infra import services
from infra.processes import Running, free_port, pid_file, stop
from infra.services import REGISTRY
from tests.conftest import settings_for

pytestmark = pytest.mark.integration


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, ctype, body = get(f"{url}/metrics")
    assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_registry_serves_metrics_health_and_json_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a broker of its own: a second registry writing to the session's _schemas would hand out ids
    # the session's registry does not know (it does not follow the topic)
    monkeypatch.setenv("BACKBEAT_LOG_FORMAT", "json")  # start_registry passes the environment on
    own = settings_for(tmp_path, free_port(), free_port())
    services.up(own)
    running = Running(**json.loads(pid_file(own.run_dir, REGISTRY).read_text()))
    try:
        url = own.registry_url
        status, ctype, body = get(f"{url}/health")
        assert status == 200 and ctype.startswith("application/json")
        health = json.loads(body)
        assert health["status"] == "ready" and health["process"] == "schema-registry"
        assert health["components"]["schema-registry"]["ready"] is True

        before = samples(url)
        written = ("backbeat_records_out_total", (("component", "schema-registry"), ("topic", "_schemas")))
        entries = ("backbeat_state_entries", (("component", "schema-registry"),))
        assert before[written] == 0
        assert before[("backbeat_up", (("process", "schema-registry"),))] == 1

        subject = "ops-backbeat.test.Ops"
        schema = json.dumps({"type": "record", "name": "Ops", "namespace": "backbeat.test",
                             "fields": [{"name": "a", "type": "string"}]})  # fmt: skip
        SchemaRegistryClient({"url": url}).register_schema(subject, Schema(schema, "AVRO"))
        after = samples(url)
        assert after[written] == 1
        assert after[entries] == before[entries] + 1
        # the Confluent API is unchanged beside them
        assert get(f"{url}/subjects")[0] == 200
    finally:
        assert stop(running)
        services.down(own)
    lines = Path(running.log).read_text().splitlines()
    assert lines
    records = [json.loads(line) for line in lines]  # every line is JSON (the log has stdout too)
    assert all(r["process"] == "schema-registry" for r in records)
    assert any(r["event"].startswith("serving on http://") for r in records)
    assert records[-1]["event"] == "stopped"
