"""The Grafana dashboard and Prometheus scrape configuration in infra/grafana/ stay in step with
what the processes export: every series a panel queries is one backbeat exports, and every
process kind's default ops port is scraped."""

from __future__ import annotations

import json
import re

from prometheus_client import generate_latest

from infra import metrics, ops
from infra.settings import REPO_ROOT

GRAFANA = REPO_ROOT / "infra" / "grafana"


def _exported_names() -> set[str]:
    """Series names in a scrape with one component reporting every field, plus the API's."""
    metrics.register(
        "dash:probe",
        lambda: metrics.Observation(records_in={"t": 1}, records_out={"t": 1}, dead_letters={"r": 1},
                                    state_entries=1, positions={("t", 0): 1}, saga_states={("s", "x"): 1},
                                    ready=True),  # fmt: skip
    )
    metrics.observe_batch("dash:probe", 0.1)
    metrics.set_process("dash", high_watermarks=lambda topic: {0: 5})
    try:
        text = generate_latest(metrics.REGISTRY).decode()
    finally:
        metrics.unregister("dash:probe")
        metrics.set_process("", None)
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    # the HTTP API's own (infra/api.py)
    names |= {"backbeat_http_requests_total", "backbeat_http_request_duration_seconds_bucket"}
    return names


def test_every_queried_series_is_exported():
    dash = json.loads((GRAFANA / "backbeat.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"]]
    used = {m for e in exprs for m in re.findall(r"\b(?:backbeat|process)_[a-z_]+", e)}
    exported = _exported_names()
    assert used and used <= exported, sorted(used - exported)
    # and the main families each have a panel
    for family in ("backbeat_consumer_lag", "backbeat_records_in_total", "backbeat_dead_letters_total",
                   "backbeat_batch_duration_seconds_bucket", "backbeat_saga_states", "backbeat_ready"):  # fmt: skip
        assert family in used


def test_panels_have_unique_ids_and_the_datasource_is_an_input():
    dash = json.loads((GRAFANA / "backbeat.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert dash["__inputs"][0]["name"] == "DS_PROMETHEUS"
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in dash["panels"])


def test_the_scrape_config_covers_every_process_kind():
    text = (GRAFANA / "prometheus.yml").read_text()
    for process, port in {**ops.DEFAULT_PORTS, "schema-registry": 8081, "api": 8000}.items():
        assert re.search(rf"job_name: {process}[^\n]*\n\s+static_configs: \[\{{targets: \[\"127.0.0.1:{port}\"\]", text)
