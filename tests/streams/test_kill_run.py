"""A worker running every agent (listening ingest, user and track features, ad reporting) is
SIGKILLed five times mid-stream: its sessions, feature values, ad reports and budget events
equal an uninterrupted run's exactly, and no output identity appears twice on any output topic
(issue 13).

The inputs are the real 30Music listens and Open Bandit ad events, replayed ``copies`` times with
distinct user, event and impression ids. The CI test takes the first half of each file (43,234
listens, 5,019 ad events); the soak test the files ten times (864,680 listens, 100,380 ad events:
the "1M-event run"), run it with ``make soak`` (``pytest -m soak``).
"""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from benchmarks.common import replayed_ad_events, replayed_listens
from events.control import END_OF_INPUT_MS, watermark_headers
from events.importers.ads import without_type
from events.log import read_to_end
from events.offsets import high_watermarks
from events.producer import EventProducer
from events.registry_client import registry_for
from infra.provision import apply_topics
from infra.settings import Settings
from streams.ads import AdsConfig
from streams.config import IngestConfig
from streams.features_config import FeaturesConfig
from streams.runtime.published import output_id
from tests.conftest import env_for, wait_for
from tests.streams.workers import Worker

pytestmark = pytest.mark.integration

AGENTS = ("ingest", "features", "tracks", "ads")


class Run:
    """One worker's isolated outputs for the shared inputs."""

    def __init__(
        self, settings: Settings, name: str, listens: str, ads: str, counts: tuple[int, int], log: Path
    ) -> None:
        self.settings = settings
        self.listens, self.ad_events = counts
        self.ingest = IngestConfig(app_id=name, source_topic=listens, sessions_topic=f"{name}.sessions",
                                   dlq_topic=f"{name}.dlq")  # fmt: skip
        self.features = FeaturesConfig.from_env(
            {
                "BACKBEAT_FEATURES_USERS_TOPIC": f"{name}.fusers",
                "BACKBEAT_FEATURES_TRACKS_TOPIC": f"{name}.ftracks",
            }
        )
        self.ads = AdsConfig(source_topic=ads, reports_topic=f"{name}.reports", campaigns_topic=f"{name}.budget",
                             late_topic=f"{name}.late", dlq_topic=f"{name}.adlq")  # fmt: skip
        apply_topics(settings, self.ingest.topic_specs() + self.features.topic_specs(name, 6)
                     + self.ads.topic_specs(name))  # fmt: skip
        env = env_for(settings)
        env.update(
            BACKBEAT_INGEST_APP_ID=name,
            BACKBEAT_INGEST_SOURCE_TOPIC=listens,
            BACKBEAT_INGEST_SESSIONS_TOPIC=self.ingest.sessions_topic,
            BACKBEAT_INGEST_DLQ_TOPIC=self.ingest.dlq_topic,
            BACKBEAT_FEATURES_USERS_TOPIC=self.features.users_topic,
            BACKBEAT_FEATURES_TRACKS_TOPIC=self.features.tracks_topic,
            BACKBEAT_ADS_SOURCE_TOPIC=ads,
            BACKBEAT_ADS_REPORTS_TOPIC=self.ads.reports_topic,
            BACKBEAT_ADS_CAMPAIGNS_TOPIC=self.ads.campaigns_topic,
            BACKBEAT_ADS_LATE_TOPIC=self.ads.late_topic,
            BACKBEAT_ADS_DLQ_TOPIC=self.ads.dlq_topic,
            BACKBEAT_INGEST_BATCH="5000",  # more batches, so a kill lands between checkpoints
            BACKBEAT_INGEST_STATS_INTERVAL_S="0.5",
        )
        self.worker = Worker(env, log)

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.ingest.sessions_topic, self.features.users_topic, self.features.tracks_topic,
                self.ads.reports_topic, self.ads.campaigns_topic, self.ads.late_topic, self.ingest.dlq_topic,
                self.ads.dlq_topic)  # fmt: skip

    def stats(self) -> dict[str, dict[str, Any]]:
        return {name: s for name in AGENTS if (s := self.worker.last_stats(name)) is not None}

    def progress(self) -> float:
        """The share of the inputs the slowest agent has taken."""
        s = self.stats()
        if len(s) < len(AGENTS):
            return 0.0
        return min(s["features"]["records_in"] / self.listens, s["ads"]["records_in"] / self.ad_events)

    def wait_done(self, mark: int, timeout_s: float) -> dict[str, dict[str, Any]]:
        """Until every agent took every record, every track window closed, and two stats polls
        a second apart show the same counts."""
        seen: list[tuple] = []

        def done() -> dict[str, dict[str, Any]] | None:
            s = self.stats()
            if len(s) < len(AGENTS) or s["ingest"]["records_in"] < self.listens:
                return None
            if s["features"]["records_in"] < self.listens or s["ads"]["records_in"] < self.ad_events:
                return None
            marks = list(s["tracks"]["track_watermarks"].values())
            if len(marks) < 6 or min(marks) < mark:
                return None
            now = tuple(s[a]["batches"] for a in AGENTS)
            if seen and seen[-1] == now:
                return s
            seen.append(now)
            time.sleep(1.0)
            return None

        return wait_for(done, timeout_s, "every agent to finish")  # type: ignore[return-value]

    def read(self) -> dict[str, dict[str, bytes]]:
        """Every output topic's records by identity, as a digest of the value (the Avro body for
        events: the same values encode to the same bytes); fails on an identity seen twice. Every
        record is also decoded, so a value that does not decode fails here."""
        decoder = registry_for(self.settings.registry_url).decoder()
        out: dict[str, dict[str, bytes]] = {}
        for topic in self.outputs:
            raw = topic.endswith((".dlq", ".adlq", ".late"))  # copies of source records
            by_id: dict[str, bytes] = {}
            twice: list[str] = []
            parts = high_watermarks(self.settings, topic)
            for batch in read_to_end(self.settings, {(topic, p): 0 for p in parts}, purpose="kill-run"):
                values = [m.value() for m in batch]
                if not raw:
                    _, errors = decoder.decode_many(values)
                    assert not errors, f"{topic}: {errors[:3]}"
                for m, value in zip(batch, values, strict=True):
                    ident = output_id(m.headers())
                    if ident in by_id:
                        twice.append(ident)
                    body = value if raw else value[5:]
                    by_id[ident] = hashlib.blake2b(body, digest_size=16).digest()
            assert not twice, f"{len(twice)} identities published twice on {topic}, e.g. {twice[:3]}"
            out[topic.split(".", 1)[1]] = by_id
        return out


def run_scenario(
    stack: Settings, unique: Callable[[str], str], tmp_path: Path, copies: int, share: float, timeout_s: float
) -> None:
    """Inputs: the files ``copies`` times (the listens' copies interleaved in event time, the ad
    copies 8 days apart), then the first ``share`` of them."""
    listens_topic, ads_topic = unique("kill-listens"), unique("kill-ads")
    listens = sorted(replayed_listens(copies), key=lambda r: r["occurred_at"])
    ads = replayed_ad_events(copies)
    if share < 1:
        listens = listens[: int(share * len(listens))]
        ads = ads[: int(share * len(ads))]
    apply_topics(stack, IngestConfig(source_topic=listens_topic).topic_specs()[:1]
                 + AdsConfig(source_topic=ads_topic).topic_specs("x")[:1])  # fmt: skip
    producer = EventProducer(stack)
    for lo in range(0, len(listens), 50_000):
        producer.send_many(listens_topic, "ListenRecorded", listens[lo : lo + 50_000], key_field="user_id",
                           time_field="occurred_at", source="/tests")  # fmt: skip
    for kind in ("AdImpressionServed", "AdClicked"):
        producer.encoder(ads_topic, kind)
    for e in ads:
        producer.send_many(ads_topic, e["event_type"], [without_type(e)], key_field="campaign_id",
                           time_field="occurred_at", source="/tests")  # fmt: skip
    producer.flush(300)
    mark = max(r["occurred_at"] for r in listens) + END_OF_INPUT_MS
    ad_mark = max(e["occurred_at"] for e in ads) + END_OF_INPUT_MS
    raw = Producer(stack.producer_conf())
    for p in range(6):
        raw.produce(listens_topic, value=b"", partition=p, headers=watermark_headers(mark))
        raw.produce(ads_topic, value=b"", partition=p, headers=watermark_headers(ad_mark))
    assert raw.flush(10) == 0

    counts = (len(listens), len(ads))
    runs = [
        Run(stack, unique(f"kill-{label}"), listens_topic, ads_topic, counts, tmp_path / f"{label}.log")
        for label in ("clean", "killed")
    ]
    clean, killed = runs
    try:
        clean.worker.start()
        clean.wait_done(mark, timeout_s)
        clean.worker.kill()
        expected = clean.read()

        killed.worker.start()

        def restores() -> int:
            return killed.worker.log.read_text(errors="replace").count("restored partitions")

        for point in (0.15, 0.3, 0.45, 0.6, 0.75):  # five SIGKILLs mid-stream
            wait_for(lambda point=point: killed.progress() >= point, timeout_s, f"{point:.0%} of the inputs")
            killed.worker.kill(signal.SIGKILL)
            before = restores()
            killed.worker.start()
            # the log is appended to: wait for this incarnation's restores before its progress counts
            wait_for(lambda before=before: restores() >= before + len(AGENTS), 120, "every agent to restore")
        final = killed.wait_done(mark, timeout_s)
        got = killed.read()
    finally:
        for run in runs:
            run.worker.kill()
    assert final["ingest"]["reconciles"] and final["features"]["reconciles"] and final["ads"]["reconciles"]
    assert (
        len(expected["sessions"]) > 7000 * copies * share
        and len(expected["reports"]) > 60_000 * copies * share
    )
    for name, records in expected.items():
        assert got[name] == records, f"{name}: the killed run differs from the uninterrupted one"
    restarts = killed.worker.log.read_text(errors="replace").count("restored partitions")
    assert restarts >= 6 * 4, "every agent restored its partitions after each of the five kills"


def test_five_sigkills_mid_stream_change_no_output(
    stack: Settings, unique: Callable[[str], str], tmp_path: Path
):
    run_scenario(stack, unique, tmp_path, copies=1, share=0.5, timeout_s=600)


@pytest.mark.soak
def test_five_sigkills_in_a_one_million_event_run_change_no_output(
    stack: Settings, unique: Callable[[str], str], tmp_path: Path
):
    run_scenario(stack, unique, tmp_path, copies=10, share=1.0, timeout_s=3600)
