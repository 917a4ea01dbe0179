"""The ad-reporting agent end to end on the real broker: its reports equal the DuckDB ground truth
over what ``ads.delivery`` holds (late events, duplicates, unknown impressions, clicks outside the
attribution window, budgets), late events land on the late topic with their reason, and a worker
killed (SIGKILL) twice mid-stream publishes exactly the reports of an uninterrupted run, none of
them twice."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from events.campaigns import CAMPAIGNS_FILE, load_campaigns
from events.control import END_OF_INPUT_MS, is_control, watermark_headers, watermark_of
from events.importers.ads import ad_events, without_type
from events.offsets import high_watermarks
from events.producer import EventProducer
from events.registry_client import registry_for
from infra.demo import group_progress
from infra.provision import apply_topics
from infra.settings import Settings
from streams.ads import AdsConfig
from streams.runtime.runner import group_id
from tests.conftest import DATA, env_for, wait_for
from tests.streams import ad_reference as ref
from tests.streams.test_ad_reporting import ATTRIBUTION, CAMPAIGNS, GRACE, make_rows
from tests.streams.workers import TopicReader, Worker

pytestmark = pytest.mark.integration

#: Restarted workers find a backlog of small changelog and partial batches; on the embedded broker
#: a Fetch that lists them for longer than the fetch wait returns nothing and a partition can stall
#: under load (docs/broker.md §7), so the crash runs wait longer per Fetch.
T_BAD = 1_574_553_600_000
SLOW_FETCH = {"BACKBEAT_INGEST_FETCH_WAIT_MS": "500"}

ADS_ALL = DATA / "ads_open_bandit" / "random" / "all" / "all.csv.gz"

CAMPAIGNS_TOML = "\n".join(
    f'[[campaign]]\ncampaign_id = "{c.campaign_id}"\nitems = {list(c.items)}\ncpm_minor = {c.cpm_minor}\n'
    f'cpc_minor = {c.cpc_minor}\ndaily_budget_minor = {c.daily_budget_minor}\ncurrency = "{c.currency}"\n'
    for c in CAMPAIGNS.by_id.values()
)


class AdSetup:
    """An isolated copy of the ad topics on the shared broker and a worker running the agent."""

    def __init__(
        self, settings: Settings, name: str, source: str, tmp: Path, log: str,
        campaigns: Path | None = None, **env: str,
    ) -> None:  # fmt: skip
        if campaigns is None:
            campaigns = tmp / "campaigns.toml"
            campaigns.write_text(CAMPAIGNS_TOML)
        self.settings = settings
        self.name = name
        self.source = source
        self.config = AdsConfig(
            grace_ms=GRACE, attribution_ms=ATTRIBUTION, campaigns_file=campaigns, source_topic=source,
            reports_topic=f"{name}.reports", campaigns_topic=f"{name}.campaigns", late_topic=f"{name}.late",
            dlq_topic=f"{name}.dlq",
        )  # fmt: skip
        apply_topics(settings, self.config.topic_specs(name))
        self.env = {
            **env_for(settings),
            "BACKBEAT_INGEST_APP_ID": name,
            "BACKBEAT_STREAMS_AGENTS": "ads",
            "BACKBEAT_ADS_GRACE": f"{GRACE}ms",
            "BACKBEAT_ADS_ATTRIBUTION": f"{ATTRIBUTION}ms",
            "BACKBEAT_ADS_CAMPAIGNS": str(campaigns),
            "BACKBEAT_ADS_SOURCE_TOPIC": source,
            "BACKBEAT_ADS_REPORTS_TOPIC": self.config.reports_topic,
            "BACKBEAT_ADS_CAMPAIGNS_TOPIC": self.config.campaigns_topic,
            "BACKBEAT_ADS_LATE_TOPIC": self.config.late_topic,
            "BACKBEAT_ADS_DLQ_TOPIC": self.config.dlq_topic,
            "BACKBEAT_INGEST_STATS_INTERVAL_S": "0.25",
            "BACKBEAT_INGEST_BATCH_WITHIN_S": "0.05",
            **env,
        }
        self.worker = Worker(self.env, tmp / log)

    def wait_done(self, mark: int, total: int = 0) -> dict[str, Any]:
        """Until every partition's watermark reached ``mark`` and the counts stopped moving."""
        seen: list[dict[str, Any]] = []

        def done() -> bool:
            stats = self.worker.last_stats("ads")
            if stats is None or stats["records_in"] < total:
                return False
            marks = list(stats["watermarks"].values())
            group = group_id(self.name, "ad-reporting")
            if not marks or min(marks) < mark or not group_progress(self.settings, group, self.source).done:
                return False  # every offset committed (partitions without news are not restored)
            if seen and all(seen[-1][k] == stats[k] for k in ("reports", "exhausted", "batches")):
                return True
            seen.append(stats)
            time.sleep(0.6)
            return False

        wait_for(done, 120, "the ad-reporting agent to finish")
        return seen[-1]

    def read(self, topic: str) -> list[Any]:
        reader = TopicReader(self.settings, topic, 6)
        try:
            end = sum(high_watermarks(self.settings, topic).values())
            wait_for(lambda: len(reader.poll()) >= end, 30, f"all of {topic}")
            return list(reader.records)
        finally:
            reader.close()

    def reports(self) -> tuple[dict, dict]:
        decoder = registry_for(self.settings.registry_url).decoder()
        by_id: dict[str, dict] = {}
        messages = self.read(self.config.reports_topic)
        for msg in messages:
            e = decoder.decode(msg.value())
            assert e["event_id"] not in by_id, "a report published twice"
            by_id[e["event_id"]] = e
        got = {
            (e["campaign_id"], e["ad_id"], e["position"], e["window_size_ms"], e["window_start"]): (
                e["impressions"], e["clicks"], e["spend_micros"], e["overdelivery_impressions"],
                e["overdelivery_clicks"], e["overdelivery_spend_micros"], e["clicks_unknown_impression"],
                e["clicks_outside_attribution"],
            )
            for e in by_id.values()
        }  # fmt: skip
        exhausted = {}
        for msg in self.read(self.config.campaigns_topic):
            e = decoder.decode(msg.value())
            key = (e["campaign_id"], e["period_start"])
            assert key not in exhausted, "CampaignBudgetExhausted published twice"
            exhausted[key] = (e["occurred_at"], e["spent_minor"])
        return got, exhausted


def produce(settings: Settings, source: str, rows: list[ref.AdRow]) -> int:
    """Produce the rows' events in order (keyed by campaign), then a closing watermark."""
    producer = EventProducer(settings)
    for r in rows:
        if r.kind == "mark":
            continue
        base = {"event_id": r.event_id, "impression_id": r.impression_id, "campaign_id": r.campaign,
                "ad_id": r.ad, "occurred_at": r.t, "user_id": None, "position": r.position}  # fmt: skip
        if r.kind == "click":
            producer.send_many(source, "AdClicked", [{**base, "click_id": r.event_id}],
                               key_field="campaign_id", time_field="occurred_at", source="/tests")  # fmt: skip
        else:
            record = {**base, "format": "DISPLAY", "policy": "random", "propensity": 0.0125}
            producer.send_many(source, "AdImpressionServed", [record], key_field="campaign_id",
                               time_field="occurred_at", source="/tests")  # fmt: skip
    producer.flush()
    mark = max(r.t for r in rows) + END_OF_INPUT_MS
    raw = Producer(settings.producer_conf())
    for p in range(6):
        raw.produce(source, value=b"", partition=p, headers=watermark_headers(mark))
    assert raw.flush(10) == 0
    return mark


def read_rows(setup: AdSetup, source: str) -> list[ref.AdRow]:
    """What the source topic holds, as reference rows (actual partitions and offsets)."""
    decoder = registry_for(setup.settings.registry_url).decoder()
    rows = []
    for msg in setup.read(source):
        headers = msg.headers() or []
        if is_control(headers):
            rows.append(ref.AdRow(msg.partition(), msg.offset(), "mark", watermark_of(headers) or -1))
            continue
        e = decoder.decode(msg.value())
        kind = "click" if "click_id" in e else "imp"
        rows.append(ref.AdRow(msg.partition(), msg.offset(), kind, e["occurred_at"], e["event_id"],
                              e["impression_id"], e["campaign_id"], e["ad_id"], e["position"]))  # fmt: skip
    return rows


@pytest.fixture
def setups() -> Iterator[list[AdSetup]]:
    made: list[AdSetup] = []
    yield made
    for s in made:
        s.worker.kill()
        if s.worker.log.exists():
            print("".join(s.worker.log.read_text(errors="replace").splitlines(True)[-30:]))


def test_reports_equal_the_ground_truth_and_survive_sigkill(
    stack: Settings, unique: Callable[[str], str], tmp_path: Path, setups: list[AdSetup]
) -> None:
    source = unique("ads-src")
    clean = AdSetup(stack, unique("ads-clean"), source, tmp_path, "clean.log")
    setups.append(clean)
    mark = produce(stack, source, make_rows(11, 1500))
    clean.worker.start()
    stats = clean.wait_done(mark)
    assert stats["reconciles"] and stats["late"] > 0
    got, exhausted = clean.reports()
    truth = ref.reports(read_rows(clean, source), CAMPAIGNS, GRACE, ATTRIBUTION)
    assert got == truth["reports"]
    assert exhausted == {k: (at, spent // 1_000_000) for k, (at, spent) in truth["exhausted"].items()}
    late = clean.read(clean.config.late_topic)
    assert len(late) == stats["late"]
    assert all(dict(m.headers())["late_reason"].endswith(b"_after_pane_closed") for m in late)
    clean.worker.kill()

    crashed = AdSetup(stack, unique("ads-crash"), source, tmp_path, "crashed.log",
                      BACKBEAT_INGEST_BATCH="40", BACKBEAT_INGEST_BATCH_WITHIN_S="0.01", **SLOW_FETCH)  # fmt: skip
    setups.append(crashed)
    crashed.worker.start()
    for share in (0.3, 0.6):
        wait_for(
            lambda share=share: ((s := crashed.worker.last_stats("ads")) is not None
                                 and s["records_in"] >= share * stats["records_in"] and s["reports"] > 0),
            120, f"{share:.0%} of the events in",
        )  # fmt: skip
        crashed.worker.kill()
        crashed.worker.start()
    crashed.wait_done(mark)
    assert crashed.reports() == (got, exhausted)


def test_the_real_open_bandit_file_gives_the_ground_truth_under_sigkill(
    stack: Settings, unique: Callable[[str], str], tmp_path: Path, setups: list[AdSetup]
) -> None:
    """The whole real file (all.csv: 10,000 impressions and their clicks), the real campaigns:
    every report, window by window, equals the GROUP BY, also after two SIGKILLs."""
    source = unique("ads-real")
    events = ad_events(ADS_ALL)
    producer = EventProducer(stack)
    for e in events:
        producer.send_many(source, e["event_type"], [without_type(e)], key_field="campaign_id",
                           time_field="occurred_at", source="/tests")  # fmt: skip
    producer.flush()
    mark = max(e["occurred_at"] for e in events) + END_OF_INPUT_MS
    raw = Producer(stack.producer_conf())
    for p in range(6):
        raw.produce(source, value=b"", partition=p, headers=watermark_headers(mark))
    assert raw.flush(10) == 0

    real = load_campaigns(CAMPAIGNS_FILE)
    crashed = AdSetup(stack, unique("ads-real-crash"), source, tmp_path, "crashed.log", campaigns=CAMPAIGNS_FILE,
                      BACKBEAT_INGEST_BATCH="300", BACKBEAT_INGEST_BATCH_WITHIN_S="0.01", **SLOW_FETCH)  # fmt: skip
    setups.append(crashed)
    crashed.worker.start()
    for share in (0.3, 0.6):
        wait_for(
            lambda share=share: ((s := crashed.worker.last_stats("ads")) is not None
                                 and s["records_in"] >= share * len(events) and s["reports"] > 0),
            120, f"{share:.0%} of the events in",
        )  # fmt: skip
        crashed.worker.kill()
        crashed.worker.start()
    crashed.wait_done(mark)
    got, exhausted = crashed.reports()
    truth = ref.reports(read_rows(crashed, source), real, GRACE, ATTRIBUTION)
    assert len(truth["reports"]) > 10_000 and truth["exhausted"]
    assert got == truth["reports"]
    assert exhausted == {k: (at, spent // 1_000_000) for k, (at, spent) in truth["exhausted"].items()}


def test_bad_records_are_dead_lettered_with_their_reason_and_counts_reconcile(
    stack: Settings, unique: Callable[[str], str], tmp_path: Path, setups: list[AdSetup]
) -> None:
    source = unique("ads-bad")
    setup = AdSetup(stack, unique("ads-bad"), source, tmp_path, "bad.log")
    setups.append(setup)
    producer = EventProducer(stack)
    good = {"event_id": "i1", "impression_id": "i1", "campaign_id": "c0", "ad_id": "0", "occurred_at": T_BAD,
            "user_id": None, "position": 1, "format": "DISPLAY", "policy": None, "propensity": None}  # fmt: skip
    producer.send_many(source, "AdImpressionServed", [good, {**good, "event_id": "i2", "impression_id": "i2",
                       "campaign_id": "no-such-campaign"}], key_field="campaign_id", time_field="occurred_at",
                       source="/tests")  # fmt: skip
    producer.produce_raw(source, [b"not avro"], [b"c0"])
    producer.flush()
    raw = Producer(stack.producer_conf())
    for p in range(6):
        raw.produce(source, value=b"", partition=p, headers=watermark_headers(T_BAD + END_OF_INPUT_MS))
    assert raw.flush(10) == 0
    setup.worker.start()
    stats = setup.wait_done(T_BAD + END_OF_INPUT_MS, total=3)
    assert (stats["records_in"], stats["impressions"], stats["dead_lettered"]) == (3, 1, 2)
    assert stats["reconciles"]
    scraped = setup.worker.metrics()  # /metrics tells the same, by reason
    ads = ("component", "agent:ad-reporting")
    assert scraped[("backbeat_records_in_total", (ads, ("topic", source)))] == 3
    assert {r: scraped[("backbeat_dead_letters_total", (ads, ("reason", r)))]
            for r in ("decode_error", "validation_error")} == {"decode_error": 1, "validation_error": 1}  # fmt: skip
    assert ("backbeat_state_entries", (ads,)) in scraped
    dead = setup.read(setup.config.dlq_topic)
    reasons = sorted(dict(m.headers())["dlq_reason"].decode() for m in dead)
    assert reasons == ["decode_error", "validation_error"]
    assert any(b"no-such-campaign" in dict(m.headers())["dlq_error"] for m in dead)
    assert {m.value() for m in dead} >= {b"not avro"}  # the original bytes are kept
