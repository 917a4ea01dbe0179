"""Parser of the Open Bandit ad logs (ZOZOTOWN; ``data/ads_open_bandit``) into
``AdImpressionServed`` and ``AdClicked`` events, in the order the importer produces them (pure:
no Kafka; the one function that reads a file is :func:`parse_ads_file`).

Format: a CSV with a header whose first column is the unnamed row index, then ``timestamp``
(``2019-11-24 00:00:34.762830+00:00``, µs, UTC), ``item_id`` (0-79), ``position`` (1-3, the slot
in ZOZOTOWN's recommendation widget), ``click`` (0/1), ``propensity_score`` (the probability the
logging policy chose the item there), ``user_feature_0..3`` (hashed) and the user-item
affinities (ignored). Saito, Aihara, Matsutani, Narita, "Open Bandit Dataset and Pipeline",
NeurIPS 2021 Datasets and Benchmarks; data CC BY 4.0 by ZOZO.

Rules:

* **ids**: ``impression_id = event_id("openbandit", timestamp µs, item, position,
  user_feature_0..3, propensity)`` — the row's content, not its line number or file name — and
  the impression's ``event_id`` is the impression id. A clicked row also gives ``click_id =
  event_id("openbandit-click", impression_id)``, the click's ``event_id``. Re-importing a file
  re-sends the same ids; rows of equal content collapse into the first one (counted as
  duplicates, its click flag wins).
* **campaign**: the campaign whose ``items`` hold the row's item in the campaigns file
  (``infra/campaigns.toml``, :mod:`events.campaigns`); ``ad_id`` is the item id as a string.
* **click delay** (the data set records that an impression was clicked, not when): a click
  happens at the impression time plus :func:`click_delay_ms` of the impression id, a
  deterministic function of a SHA-256 hash: 95% of clicks come 2 s to 10 min after their
  impression, 5% 30 min + 1 s to 60 min - 1 s after it, beyond the agent's 30-minute
  attribution window, so the reports' ``clicks_outside_attribution`` is exercised by real data.
* **time**: ``occurred_at`` is the µs timestamp floored to ms; impressions and clicks are merged
  in event-time order (ties: impressions before clicks, then file order).
* **rejects** (line number and reason, never fatal): wrong column count, a timestamp that is not
  ISO-8601 with a time zone or lies outside 2000..2100, an item that is not an integer or belongs
  to no campaign, a position outside 1-3, a click flag other than 0/1, a propensity that is not
  a number in [0, 1], text that is not UTF-8.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa

from events.campaigns import CAMPAIGNS_FILE, Campaigns, load_campaigns
from events.importers.base import MAX_KEPT_REJECTS, Record, Reject, event_id
from infra.errors import ConfigError
from infra.resources import open_data

SOURCE = "openbandit"
IMPRESSION = "AdImpressionServed"
CLICK = "AdClicked"
#: Columns the header must name (others, such as the affinities, are ignored).
REQUIRED = (
    "timestamp",
    "item_id",
    "position",
    "click",
    "propensity_score",
    "user_feature_0",
    "user_feature_1",
    "user_feature_2",
    "user_feature_3",
)
POSITIONS = (1, 2, 3)
#: ZOZOTOWN's recommendation widget shows fashion items: display ads.
AD_FORMAT = "DISPLAY"
#: Logging policies of the Open Bandit data set (the folder above the campaign folder).
POLICIES = ("random", "bts")

SECOND, MINUTE = 1_000, 60_000
#: The click delay rule (ms, bounds inclusive): one click in LONG_ONE_IN comes late.
SHORT_DELAY_MS = (2 * SECOND, 10 * MINUTE)
LONG_DELAY_MS = (30 * MINUTE + SECOND, 60 * MINUTE - SECOND)
LONG_ONE_IN = 20

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)
#: Times outside [2000-01-01, 2100-01-01) (µs) are rejected as implausible.
MIN_TIME_US, MAX_TIME_US = 946_684_800 * 10**6, 4_102_444_800 * 10**6


def click_delay_ms(impression_id: str) -> int:
    """The delay (ms) between an impression and its click: ``h = SHA-256("click-delay|" +
    impression_id)``; when the first 8 bytes of ``h`` (big-endian) are divisible by
    :data:`LONG_ONE_IN` (5% of impressions) the delay is in :data:`LONG_DELAY_MS`
    (30 min + 1 s .. 60 min - 1 s), else in :data:`SHORT_DELAY_MS` (2 s .. 10 min); within the
    range it is ``low + (next 8 bytes) mod (high - low + 1)``. Deterministic across runs and
    machines; the rule is ours (the data set has no click times)."""
    digest = hashlib.sha256(f"click-delay|{impression_id}".encode()).digest()
    pick, spread = int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:16], "big")
    low, high = LONG_DELAY_MS if pick % LONG_ONE_IN == 0 else SHORT_DELAY_MS
    return low + spread % (high - low + 1)


def policy_of(path: Path) -> str | None:
    """The logging policy of an Open Bandit file from its folder (``…/random/all/all.csv`` →
    ``random``), or ``None`` when the path does not say."""
    name = path.parent.parent.name
    return name if name in POLICIES else None


@dataclass
class ParsedAds:
    """An Open Bandit file as events: ``events`` in produce order (dicts with the Avro fields of
    their type plus ``event_type``, ``AdImpressionServed`` or ``AdClicked``), ``rows_read``
    (data rows, header excluded), ``impressions``, ``clicks``, ``duplicates`` (rows collapsed
    into an earlier one of equal content), ``rejected`` (all) and ``rejects`` (the first
    :data:`~events.importers.base.MAX_KEPT_REJECTS`, with line and reason).
    ``rows_read = impressions + duplicates + rejected`` always holds."""

    events: list[Record] = field(default_factory=list)
    rows_read: int = 0
    impressions: int = 0
    clicks: int = 0
    duplicates: int = 0
    rejected: int = 0
    rejects: list[Reject] = field(default_factory=list)

    def reject(self, line: int, reason: str) -> None:
        """Count a rejected row and keep its reason (up to the cap)."""
        self.rejected += 1
        if len(self.rejects) < MAX_KEPT_REJECTS:
            self.rejects.append(Reject(line, reason))

    def reconciles(self) -> bool:
        """True when every row read is accounted for and every click has its impression."""
        kept = sum(1 for e in self.events if e["event_type"] == IMPRESSION)
        clicked = sum(1 for e in self.events if e["event_type"] == CLICK)
        return (
            self.rows_read == self.impressions + self.duplicates + self.rejected
            and kept == self.impressions
            and clicked == self.clicks
        )


def _lines(raw: Iterable[bytes], out: ParsedAds) -> Iterator[tuple[int, str]]:
    """Number and decode lines; a data line that is not UTF-8 is rejected, not fatal."""
    for number, line in enumerate(raw, start=1):
        try:
            yield number, line.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.rows_read += 1
            out.reject(number, f"not UTF-8 text: {exc.reason} at byte {exc.start}")


def _micros(stamp: str) -> int:
    """µs since the epoch of an ISO-8601 time with a zone.

    Raises:
        ValueError: not ISO-8601, no time zone, or outside 2000..2100 (the message says which).
    """
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        raise ValueError(f"timestamp is not ISO-8601: {stamp!r}") from None
    if moment.tzinfo is None:
        raise ValueError(f"timestamp has no time zone: {stamp!r}")
    us = (moment - _EPOCH) // _MICRO
    if not MIN_TIME_US <= us < MAX_TIME_US:
        raise ValueError(f"timestamp {stamp} is outside 2000..2100")
    return us


def _impression(
    cols: Sequence[str], at: dict[str, int], campaigns: Campaigns, policy: str | None
) -> tuple[Record, bool]:
    """The impression of one row and its click flag.

    Raises:
        ValueError: a bad value (the message is the reject reason).
    """
    us = _micros(cols[at["timestamp"]].strip())
    raw_item, raw_pos = cols[at["item_id"]].strip(), cols[at["position"]].strip()
    try:
        item = int(raw_item)
    except ValueError:
        raise ValueError(f"item_id is not an integer: {raw_item!r}") from None
    campaign = campaigns.by_item.get(item)
    if campaign is None:
        raise ValueError(f"item {item} belongs to no campaign of the campaigns file")
    try:
        position = int(raw_pos)
    except ValueError:
        raise ValueError(f"position is not an integer: {raw_pos!r}") from None
    if position not in POSITIONS:
        raise ValueError(f"position {position} is outside 1-3")
    click = cols[at["click"]].strip()
    if click not in ("0", "1"):
        raise ValueError(f"click must be 0 or 1, not {click!r}")
    raw_prop = cols[at["propensity_score"]].strip()
    try:
        propensity = float(raw_prop)
    except ValueError:
        raise ValueError(f"propensity_score is not a number: {raw_prop!r}") from None
    if not 0.0 <= propensity <= 1.0:
        raise ValueError(f"propensity_score {propensity} is outside [0, 1]")
    users = [cols[at[f"user_feature_{i}"]].strip() for i in range(4)]
    impression_id = event_id(SOURCE, us, item, position, *users, repr(propensity))
    record: Record = {
        "event_type": IMPRESSION,
        "event_id": impression_id,
        "impression_id": impression_id,
        "campaign_id": campaign.campaign_id,
        "ad_id": str(item),
        "occurred_at": us // 1000,
        "user_id": None,
        "position": position,
        "format": AD_FORMAT,
        "policy": policy,
        "propensity": propensity,
    }
    return record, click == "1"


def click_of(impression: Record) -> Record:
    """The ``AdClicked`` of a clicked impression (ids and delay: module docstring)."""
    click_id = event_id(f"{SOURCE}-click", impression["impression_id"])
    return {
        "event_type": CLICK,
        "event_id": click_id,
        "click_id": click_id,
        "impression_id": impression["impression_id"],
        "campaign_id": impression["campaign_id"],
        "ad_id": impression["ad_id"],
        "occurred_at": impression["occurred_at"] + click_delay_ms(impression["impression_id"]),
        "user_id": None,
        "position": impression["position"],
    }


def parse_ads(raw: Iterable[bytes], campaigns: Campaigns, *, policy: str | None = None) -> ParsedAds:
    """Parse the lines of an Open Bandit CSV (bytes, header first) into events in produce order
    (module docstring: ids, campaign, click delay, order, rejects). ``policy`` goes into every
    impression (``random``/``bts``, or ``None``).

    Raises:
        ConfigError: the header lacks a required column (another file?); the message lists them.
    """
    out = ParsedAds()
    lines = _lines(raw, out)
    first = next(lines, None)
    header = next(csv.reader([first[1]])) if first is not None else []
    missing = [name for name in REQUIRED if name not in header]
    if missing:
        raise ConfigError(
            f"not an Open Bandit CSV: the header (line 1) lacks {', '.join(missing)}; expected "
            f"',timestamp,item_id,position,click,propensity_score,user_feature_0..3,…'"
        )
    at = {name: header.index(name) for name in REQUIRED}
    width = len(header)
    seen: set[str] = set()
    # (occurred_at, kind: 0 impression / 1 click, line) orders the merge
    keyed: list[tuple[int, int, int, Record]] = []
    numbered = ((n, text) for n, text in lines if text.strip())
    for number, text in numbered:
        out.rows_read += 1
        cols = next(csv.reader([text]))
        if len(cols) != width:
            out.reject(number, f"expected {width} comma-separated columns as in the header, got {len(cols)}")
            continue
        try:
            impression, clicked = _impression(cols, at, campaigns, policy)
        except ValueError as exc:
            out.reject(number, str(exc))
            continue
        if impression["event_id"] in seen:
            out.duplicates += 1
            continue
        seen.add(impression["event_id"])
        out.impressions += 1
        keyed.append((impression["occurred_at"], 0, number, impression))
        if clicked:
            out.clicks += 1
            click = click_of(impression)
            keyed.append((click["occurred_at"], 1, number, click))
    keyed.sort(key=lambda k: k[:3])
    out.events = [record for *_, record in keyed]
    return out


def parse_ads_file(path: Path, campaigns_path: Path = CAMPAIGNS_FILE) -> ParsedAds:
    """Parse the Open Bandit CSV at ``path`` (plain or gzip) with the campaigns of ``campaigns_path`` (policy
    from the folder name, :func:`policy_of`).

    Raises:
        ConfigError: unreadable file, a file of another layout, or a bad campaigns file.
    """
    campaigns = load_campaigns(campaigns_path)
    try:
        with open_data(path) as handle:
            return parse_ads(handle, campaigns, policy=policy_of(path))
    except (OSError, EOFError) as exc:
        raise ConfigError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc


def ad_events(path: Path, campaigns_path: Path = CAMPAIGNS_FILE) -> list[Record]:
    """The events ``backbeat import ads`` produces for ``path``, in produce order (dicts with
    ``event_type`` and the Avro fields; times in ms). For ground truths: see
    :func:`events_table` to query them with DuckDB.

    Raises:
        ConfigError: as :func:`parse_ads_file`.
    """
    return parse_ads_file(path, campaigns_path).events


#: One row per event of :func:`events_table`; ``click_id`` is NULL for impressions and
#: ``format``/``policy``/``propensity`` for clicks; ``seq`` is the produce order (0-based).
EVENTS_SCHEMA = pa.schema(
    [
        pa.field("seq", pa.int64(), False),
        pa.field("event_type", pa.string(), False),
        pa.field("event_id", pa.string(), False),
        pa.field("impression_id", pa.string(), False),
        pa.field("click_id", pa.string()),
        pa.field("campaign_id", pa.string(), False),
        pa.field("ad_id", pa.string(), False),
        pa.field("position", pa.int32(), False),
        pa.field("occurred_at", pa.int64(), False),
        pa.field("format", pa.string()),
        pa.field("policy", pa.string()),
        pa.field("propensity", pa.float64()),
    ]
)


def events_table(events: Sequence[Record]) -> pa.Table:
    """``events`` (as from :func:`ad_events`) as an Arrow table of :data:`EVENTS_SCHEMA`, e.g.
    ``duckdb.sql("SELECT campaign_id, count(*) FROM t WHERE event_type = 'AdImpressionServed'
    GROUP BY 1")`` with ``t = events_table(ad_events(path))``; ``occurred_at`` stays ms."""
    names = [f.name for f in EVENTS_SCHEMA if f.name != "seq"]
    columns = {name: [e.get(name) for e in events] for name in names}
    return pa.table({"seq": list(range(len(events))), **columns}, schema=EVENTS_SCHEMA)


def without_type(record: Record) -> Record:
    """The Avro fields of an event (without ``event_type``)."""
    return {k: v for k, v in record.items() if k != "event_type"}


__all__ = [
    "CLICK",
    "EVENTS_SCHEMA",
    "IMPRESSION",
    "LONG_DELAY_MS",
    "SHORT_DELAY_MS",
    "ParsedAds",
    "ad_events",
    "click_delay_ms",
    "click_of",
    "events_table",
    "parse_ads",
    "parse_ads_file",
    "policy_of",
    "without_type",
]
