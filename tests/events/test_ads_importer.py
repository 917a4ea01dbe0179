"""The Open Bandit importer: counts against DuckDB over the real CSV, deterministic ids, the click
delay rule, event-time order, rejects (pure); produced records on the real broker."""

from __future__ import annotations

import io
import random
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from events.campaigns import load_campaigns, parse_campaigns
from events.catalog import TopicSpec
from events.console_io import consume
from events.control import END_OF_INPUT_MS
from events.importers.ads import (
    CLICK,
    IMPRESSION,
    LONG_DELAY_MS,
    SHORT_DELAY_MS,
    ad_events,
    click_delay_ms,
    events_table,
    parse_ads,
    parse_ads_file,
    policy_of,
    without_type,
)
from events.importers.base import event_id
from events.importers.run import import_ads
from infra.errors import ConfigError
from infra.provision import apply_topics
from infra.resources import read_data_bytes
from infra.settings import Settings
from tests.conftest import DATA, env_for

ADS_ALL = DATA / "ads_open_bandit" / "random" / "all" / "all.csv.gz"
ADS_MEN = DATA / "ads_open_bandit" / "random" / "men" / "men.csv.gz"
HEADER = ",timestamp,item_id,position,click,propensity_score," + ",".join(
    f"user_feature_{i}" for i in range(4)
)
ROW = "{n},2019-11-24 00:00:{s:02d}.762830+00:00,{item},{pos},{click},0.0125,a,b,c,{user}"

#: Impressions and clicks per campaign straight from the CSV (DuckDB reads it, not our parser).
TRUTH = """
WITH rows AS (SELECT item_id, click FROM read_csv(?, header = true)),
     items AS (SELECT unnest(?::VARCHAR[]) AS campaign_id, unnest(?::INTEGER[]) AS item_id)
SELECT campaign_id, count(*) AS impressions, sum(click)::INTEGER AS clicks
FROM rows JOIN items USING (item_id) GROUP BY 1 ORDER BY 1
"""
#: A campaigns file holding item 3 only.
ONE_CAMPAIGN = """
[[campaign]]
campaign_id = "k"
items = [3]
cpm_minor = 1
cpc_minor = 1
daily_budget_minor = 1
currency = "EUR"
"""


def csv_bytes(*rows: str) -> io.BytesIO:
    return io.BytesIO(("\n".join([HEADER, *rows]) + "\n").encode())


def row(n: int, s: int = 0, item: int = 3, pos: int = 1, click: int = 0, user: str = "d") -> str:
    return ROW.format(n=n, s=s, item=item, pos=pos, click=click, user=user)


@pytest.fixture(scope="module")
def parsed_all():
    return parse_ads_file(ADS_ALL)


def test_real_file_counts_equal_a_duckdb_group_by(parsed_all):
    campaigns = load_campaigns()
    pairs = [(c.campaign_id, item) for c in campaigns.by_id.values() for item in c.items]
    truth = (
        duckdb.connect()
        .execute(TRUTH, [str(ADS_ALL), [p[0] for p in pairs], [p[1] for p in pairs]])
        .fetchall()
    )
    produced = events_table(parsed_all.events)
    got = (
        duckdb.connect()
        .sql(
            "SELECT campaign_id, count(*) FILTER (WHERE event_type = 'AdImpressionServed') AS i, "
            "(count(*) FILTER (WHERE event_type = 'AdClicked'))::INTEGER AS c FROM produced "
            "GROUP BY 1 ORDER BY 1"
        )
        .fetchall()
    )
    assert got == truth
    assert (parsed_all.rows_read, parsed_all.impressions, parsed_all.clicks) == (10_000, 10_000, 38)
    assert (parsed_all.duplicates, parsed_all.rejected) == (0, 0)
    assert parsed_all.reconciles()
    assert produced.num_rows == 10_038


def test_real_file_events_are_in_event_time_order_and_clicks_follow_impressions(parsed_all):
    events = parsed_all.events
    times = [e["occurred_at"] for e in events]
    assert times == sorted(times)
    position_of = {e["impression_id"]: i for i, e in enumerate(events) if e["event_type"] == IMPRESSION}
    clicks = [(i, e) for i, e in enumerate(events) if e["event_type"] == CLICK]
    assert len(clicks) == 38
    for i, click in clicks:
        imp = events[position_of[click["impression_id"]]]
        assert position_of[click["impression_id"]] < i
        assert (click["campaign_id"], click["ad_id"], click["position"]) == (
            imp["campaign_id"], imp["ad_id"], imp["position"]
        )  # fmt: skip
        assert click["occurred_at"] - imp["occurred_at"] == click_delay_ms(imp["impression_id"])
    delays = [c["occurred_at"] - events[position_of[c["impression_id"]]]["occurred_at"] for _, c in clicks]
    assert sum(d > 30 * 60_000 for d in delays) == 4  # measured: these fall outside attribution


def test_real_file_values_and_ids(parsed_all):
    first = parsed_all.events[0]
    # line 2 of all.csv: 2019-11-24 00:00:34.762830+00:00, item 14, position 3, no click
    assert first["occurred_at"] == 1_574_553_634_762  # µs floored to ms
    assert (first["ad_id"], first["position"], first["campaign_id"]) == ("14", 3, "c-01")
    assert (first["format"], first["policy"], first["propensity"], first["user_id"]) == (
        "DISPLAY", "random", 0.0125, None
    )  # fmt: skip
    assert first["event_id"] == first["impression_id"] == event_id(
        "openbandit", 1_574_553_634_762_830, 14, 3, "81ce123cbb5bd8ce818f60fb3586bba5",
        "03a5648a76832f83c859d46bc06cb64a", "c2e4f76cdbabecd33b8c762aeef386b3",
        "f97571b9c14a786aab269f0b427d2a85", "0.0125",
    )  # fmt: skip
    ids = [e["event_id"] for e in parsed_all.events]
    assert len(set(ids)) == len(ids)
    click = next(e for e in parsed_all.events if e["event_type"] == CLICK)
    assert click["click_id"] == click["event_id"] == event_id("openbandit-click", click["impression_id"])


def test_reimport_and_shuffled_rows_give_identical_events(parsed_all):
    lines = read_data_bytes(ADS_MEN).splitlines(keepends=True)
    campaigns = load_campaigns()
    once = parse_ads(lines, campaigns, policy="random")
    again = parse_ads(lines, campaigns, policy="random")
    assert once.events == again.events
    body = lines[1:]
    random.Random(7).shuffle(body)
    shuffled = parse_ads([lines[0], *body], campaigns, policy="random")
    # ids come from content, not line numbers; the order is event time (ties may differ)
    assert sorted(e["event_id"] for e in shuffled.events) == sorted(e["event_id"] for e in once.events)
    assert [e["occurred_at"] for e in shuffled.events] == [e["occurred_at"] for e in once.events]
    assert ad_events(ADS_ALL) == parsed_all.events


def test_click_delay_rule():
    delays = [click_delay_ms(event_id("x", i)) for i in range(50_000)]
    short = [d for d in delays if SHORT_DELAY_MS[0] <= d <= SHORT_DELAY_MS[1]]
    long = [d for d in delays if LONG_DELAY_MS[0] <= d <= LONG_DELAY_MS[1]]
    assert len(short) + len(long) == len(delays)  # nothing outside the two ranges
    assert 0.045 < len(long) / len(delays) < 0.055  # one in 20
    assert min(short) < 10_000 and max(short) > 590_000  # the ranges are covered
    assert min(long) < 1_900_000 and max(long) > 3_500_000
    assert click_delay_ms("abc") == click_delay_ms("abc") != click_delay_ms("abd")


def test_rejects_name_line_and_reason_and_duplicates_collapse():
    body = csv_bytes(
        row(0, s=1),
        row(1, s=1),  # same content as line 2 (index column differs): duplicate
        "2,2019-11-24 00:00:05+00:00,3,1,0,0.0125,a,b,c",  # one column short
        row(3).replace("2019-11-24 00:00:00.762830+00:00", "yesterday"),
        row(4).replace("+00:00", ""),
        row(5, item=99),
        row(6).replace(",3,1,0,", ",x,1,0,"),
        row(7, pos=4),
        row(8, click=2),
        row(9).replace("0.0125", "1.5"),
        row(10, s=2, click=1),
    )
    parsed = parse_ads(body, parse_campaigns(ONE_CAMPAIGN))
    reasons = {r.line: r.reason for r in parsed.rejects}
    assert sorted(reasons) == [4, 5, 6, 7, 8, 9, 10, 11]
    assert "expected 10 comma-separated columns" in reasons[4]
    assert "ISO-8601" in reasons[5]
    assert "time zone" in reasons[6]
    assert "item 99 belongs to no campaign" in reasons[7]
    assert "item_id is not an integer" in reasons[8]
    assert "position 4 is outside 1-3" in reasons[9]
    assert "click must be 0 or 1" in reasons[10]
    assert "outside [0, 1]" in reasons[11]
    assert (parsed.rows_read, parsed.impressions, parsed.duplicates, parsed.rejected) == (11, 2, 1, 8)
    assert parsed.clicks == 1 and len(parsed.events) == 3 and parsed.reconciles()
    assert [e["event_type"] for e in parsed.events] == [IMPRESSION, IMPRESSION, CLICK]


def test_not_utf8_row_is_rejected():
    body = io.BytesIO((HEADER + "\n").encode() + b"\xff\xfe,1\n" + (row(1) + "\n").encode())
    parsed = parse_ads(body, load_campaigns())
    assert parsed.rejected == 1 and "UTF-8" in parsed.rejects[0].reason and parsed.rejects[0].line == 2
    assert parsed.impressions == 1


def test_ties_put_impressions_before_clicks_then_file_order():
    campaigns = load_campaigns()
    clicked = parse_ads(csv_bytes(row(0, click=1)), campaigns).events
    at = clicked[1]["occurred_at"]  # the click's time: put two impressions exactly there
    stamp = (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=at)).isoformat()
    later = [f"{n},{stamp},{item},2,0,0.0125,a,b,c,z" for n, item in ((1, 5), (2, 4))]
    events = parse_ads(csv_bytes(row(0, click=1), *later), campaigns).events
    assert [(e["event_type"], e["ad_id"]) for e in events] == [
        (IMPRESSION, "3"), (IMPRESSION, "5"), (IMPRESSION, "4"), (CLICK, "3")
    ]  # fmt: skip
    assert len({e["occurred_at"] for e in events[1:]}) == 1


def test_wrong_file_and_bad_campaigns_file_are_clear_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="not an Open Bandit CSV.*lacks timestamp"):
        parse_ads(io.BytesIO(b"UserId\tSessionId\n1\t2\n"), load_campaigns())
    with pytest.raises(ConfigError, match="cannot read"):
        parse_ads_file(tmp_path / "missing.csv")
    bad = tmp_path / "campaigns.toml"
    bad.write_text("[[campaign]]\ncampaign_id = 'x'\n")
    with pytest.raises(ConfigError, match="missing or has a bad field"):
        parse_ads_file(ADS_ALL, bad)


def test_policy_from_folder():
    assert policy_of(ADS_ALL) == "random"
    assert policy_of(Path("/x/bts/men/men.csv")) == "bts"
    assert policy_of(Path("/tmp/ads.csv")) is None


# -- on the real broker ----------------------------------------------------------------------------
@pytest.mark.integration
def test_import_produces_the_events_in_order_keyed_by_campaign_then_watermarks(
    stack: Settings, unique: Callable[[str], str]
):
    topic = unique("ads.delivery")
    apply_topics(stack, [TopicSpec(topic, 6)])
    first = import_ads(stack, ADS_ALL, topic=topic)
    second = import_ads(stack, ADS_ALL, topic=topic)  # a re-import re-sends the same ids
    assert (first.rows_read, first.impressions, first.clicks, first.produced) == (10_000, 10_000, 38, 10_038)
    assert first.reconciles() and first.duplicates == 0 and first.rejected == 0
    expected = ad_events(ADS_ALL)
    assert first.watermark_ms == expected[-1]["occurred_at"] + END_OF_INPUT_MS
    assert second.watermark_ms == first.watermark_ms

    records = list(consume(stack, topic))
    data = [r for r in records if r.get("control") is None]
    controls = [r for r in records if r.get("control") == "watermark"]
    assert len(data) == 2 * 10_038 and not [r for r in data if r.get("error")]
    assert len(controls) == 2 * 6
    assert {r["watermark_ms"] for r in controls} == {first.watermark_ms}
    by_partition: dict[int, list[dict]] = defaultdict(list)
    for r in sorted(data, key=lambda r: (r["partition"], r["offset"])):
        assert r["key"] == r["value"]["campaign_id"]
        assert r["timestamp"] == r["value"]["occurred_at"]
        by_partition[r["partition"]].append(r)
    partition_of = {}
    for part, recs in by_partition.items():
        for r in recs:
            assert partition_of.setdefault(r["key"], part) == part  # one campaign, one partition
        half = len(recs) // 2
        values = [r["value"] for r in recs]
        assert values[:half] == values[half:]  # the second import repeats the first exactly
        want = [without_type(e) for e in expected if partition_of.get(e["campaign_id"]) == part]
        assert values[:half] == want  # produce order = ad_events order, per partition
        kinds = Counter(r["headers"]["ce_type"] for r in recs[:half])
        assert set(kinds) <= {"backbeat.ads.AdImpressionServed", "backbeat.ads.AdClicked"}
    assert len(partition_of) == 10


@pytest.mark.integration
def test_cli_import_ads_reports_counts_rejects_and_produces(stack: Settings, tmp_path: Path):
    env = env_for(stack) | {"COLUMNS": "200"}

    def backbeat(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "infra.cli", *args], env=env, capture_output=True, text=True, timeout=120
        )

    assert backbeat("topics", "apply").returncode == 0
    csv_file = tmp_path / "ads.csv"
    # a tag of our own in the user features keeps these ids apart from other tests' events
    tag = f"cli-{tmp_path.name}"
    body = [
        row(0, s=1, user=tag),
        row(1, s=1, user=tag),
        row(2, s=3, click=1, user=tag),
        row(3, pos=7, user=tag),
    ]
    csv_file.write_text("\n".join([HEADER, *body]) + "\n")
    result = backbeat("import", "ads", str(csv_file))
    assert result.returncode == 0, result.stderr
    assert (
        "4 rows read, 2 impressions and 1 clicks produced, 1 duplicate rows collapsed (same content), "
        "1 rejected" in result.stdout
    )
    assert "line 5: position 7 is outside 1-3" in result.stderr
    want = {e["event_id"] for e in ad_events(csv_file)}
    assert len(want) == 3
    found = {r["value"]["event_id"] for r in consume(stack, "ads.delivery") if r.get("value")}
    assert want <= found

    missing = backbeat("import", "ads", str(tmp_path / "nope.csv"))
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    bad_campaigns = tmp_path / "campaigns.toml"
    bad_campaigns.write_text("[[campaign]]\ncampaign_id = 'x'\n")
    failed = backbeat("import", "ads", str(csv_file), "--campaigns", str(bad_campaigns))
    assert failed.returncode == 1 and "missing or has a bad field" in failed.stderr
