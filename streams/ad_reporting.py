"""The per-partition state machine of the ad-reporting agent, pure Python: impressions and clicks
in (``ads.delivery``, keyed by campaign, so a campaign's events are one ordered stream), final
windowed reports, budget exhaustion and late events out.

Time is event time in ms; ``W`` is the partition watermark (largest event time seen, or a control
watermark). All windows are made of 1-minute panes (:mod:`streams.windows`):

* **late**: an event (impression or click) whose own 1-minute pane has closed when it arrives
  (``W >= pane end + grace``) is late: it goes to the late-events topic and is counted, never
  applied;
* **attribution**: a click counts for the impression it refers to when it comes at most
  ``attribution_ms`` (30 min) after it; it is then counted in the impression's pane (so in the
  windows of the impression). A click to an impression more than that before it is
  ``clicks_outside_attribution``, one to an impression the agent does not know is
  ``clicks_unknown_impression``; both are counted in the campaign pane of the click's own time.
  Impressions are remembered for twice the attribution window;
* **windows**: per campaign and per ``(ad, position)``, 1 minute (tumbling) and 1 hour advancing
  by 5 minutes. A window is final, and emitted once, when
  ``W >= window end + attribution + grace`` (every click that can count has come);
* **budget pacing**: per campaign and UTC day, spend (impressions at CPM, attributed clicks at
  CPC, in micros) adds up in log order; the event that makes it reach the daily budget emits
  one :class:`Exhausted`; impressions after it that day are **over-delivery** (counted and
  priced apart, with their clicks, never billed). The imported log is history: pacing changes
  no event, only how it is reported.

Restarts: as in :mod:`streams.user_features`, every state entry keeps the source offset of the
last event applied to it and the partition keeps the offset its checkpoint covers; the decisions
about an impression (over-delivered or not) and about a click (attributed, outside, duplicate)
are stored in the impression's entry, which the checkpoint writes before everything they affect,
so a replayed event re-applies the same decision only to entries that missed it.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from events.campaigns import MICROS, Campaigns
from streams.windows import HoppingWindows

MINUTE = 60_000
DAY = 86_400_000
#: Report windows, for campaigns and for (ad, position) alike (all made of 1-minute panes):
#: 1-minute tumbling and 1 hour advancing by 5 minutes.
CAMPAIGN_WINDOWS = (HoppingWindows(MINUTE, MINUTE, 0), HoppingWindows(60 * MINUTE, 5 * MINUTE, 0))
AD_WINDOWS = CAMPAIGN_WINDOWS

# pane counters, in this order in checkpoints:
FIELDS = (
    "impressions",
    "clicks",
    "spend_micros",
    "overdelivery_impressions",
    "overdelivery_clicks",
    "overdelivery_spend_micros",
    "clicks_unknown_impression",
    "clicks_outside_attribution",
)
_IDX = {name: i for i, name in enumerate(FIELDS)}


def report_event_id(
    campaign_id: str, ad_id: str | None, position: int | None, size_ms: int, start: int
) -> str:
    """Deterministic id of a report: 32 hex chars of sha256(campaign|ad|position|size|start)."""
    key = f"{campaign_id}|{ad_id or ''}|{position or ''}|{size_ms}|{start}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def exhausted_event_id(campaign_id: str, day_start: int) -> str:
    """Deterministic id of a ``CampaignBudgetExhausted``: sha256(campaign|exhausted|day start)."""
    return hashlib.sha256(f"{campaign_id}|exhausted|{day_start}".encode()).hexdigest()[:32]


class Report(NamedTuple):
    """A final report: campaign (``ad_id``/``position`` None) or one ad at one position."""

    campaign_id: str
    ad_id: str | None
    position: int | None
    size_ms: int
    step_ms: int
    window_start: int
    counters: tuple[int, ...]  # FIELDS order
    final_at: int  # window end + attribution + grace

    @property
    def window_end(self) -> int:
        """End of the window (exclusive)."""
        return self.window_start + self.size_ms

    @property
    def event_id(self) -> str:
        """See :func:`report_event_id`."""
        return report_event_id(self.campaign_id, self.ad_id, self.position, self.size_ms, self.window_start)

    def get(self, name: str) -> int:
        """One counter by name."""
        return self.counters[_IDX[name]]


class Exhausted(NamedTuple):
    """A campaign's daily budget was reached at event time ``at_ms`` with ``spent_micros``."""

    campaign_id: str
    day_start: int
    at_ms: int
    budget_micros: int
    spent_micros: int


class Pane:
    """Counters of one pane (campaign, or ad at a position): a list in FIELDS order."""

    __slots__ = ("counts", "offset")

    def __init__(self, offset: int = -1, counts: list[int] | None = None) -> None:
        self.offset = offset
        self.counts = counts if counts is not None else [0] * len(FIELDS)


class Impression:
    """What the agent remembers of an impression: where it counted, whether it was
    over-delivered, and the clicks seen for it (click event id → [offset, decision])."""

    __slots__ = ("campaign", "first_offset", "item", "offset", "over", "position", "t", "clicks")

    def __init__(
        self,
        campaign: str,
        item: str,
        position: int,
        t: int,
        over: bool,
        first_offset: int,
        offset: int,
        clicks: dict[str, list[Any]] | None = None,
    ) -> None:
        self.campaign = campaign
        self.item = item
        self.position = position
        self.t = t
        self.over = over
        self.first_offset = first_offset
        self.offset = offset
        self.clicks: dict[str, list[Any]] = clicks if clicks is not None else {}


class Budget:
    """Spend of one campaign on one UTC day; ``exhausted_at`` is the event time that reached
    the budget (None while under it)."""

    __slots__ = ("exhausted_at", "offset", "spent")

    def __init__(self, offset: int = -1, spent: int = 0, exhausted_at: int | None = None) -> None:
        self.offset = offset
        self.spent = spent
        self.exhausted_at = exhausted_at


CampaignPaneKey = tuple[str, int]  # (campaign, pane start)
AdPaneKey = tuple[str, str, int, int]  # (campaign, ad, position, pane start)
BudgetKey = tuple[str, int]  # (campaign, day start)


@dataclass
class Counters:
    """Events of this partition: ``events = impressions + clicks + late + duplicates +
    replayed + invalid`` (``invalid`` counted by the agent)."""

    impressions: int = 0
    clicks: int = 0
    late: int = 0
    duplicates: int = 0
    replayed: int = 0


@dataclass
class Dirty:
    """What changed since the last checkpoint."""

    impressions: set[str] = field(default_factory=set)
    budgets: set[BudgetKey] = field(default_factory=set)
    campaign_panes: set[CampaignPaneKey] = field(default_factory=set)
    ad_panes: set[AdPaneKey] = field(default_factory=set)
    dropped_impressions: set[str] = field(default_factory=set)
    dropped_campaign_panes: set[CampaignPaneKey] = field(default_factory=set)
    dropped_ad_panes: set[AdPaneKey] = field(default_factory=set)
    dropped_budgets: set[BudgetKey] = field(default_factory=set)
    watermark: bool = False


class AdPartition:
    """The ad-reporting state of one partition of ``ads.delivery`` (module docstring)."""

    def __init__(
        self, partition: int, campaigns: Campaigns, grace_ms: int, attribution_ms: int = 30 * MINUTE
    ) -> None:
        if attribution_ms % MINUTE or grace_ms < 0:
            raise ValueError("the attribution window must be whole minutes and the grace period >= 0")
        self.partition = partition
        self.campaigns = campaigns
        self.grace = grace_ms
        self.attribution = attribution_ms
        self.watermark = -1
        self.offset = -1
        self.campaign_panes: dict[CampaignPaneKey, Pane] = {}
        self.ad_panes: dict[AdPaneKey, Pane] = {}
        self.impressions: dict[str, Impression] = {}
        self.budgets: dict[BudgetKey, Budget] = {}
        self.counters = Counters()
        self.dirty = Dirty()
        self._closed_up_to = -1

    # -- events ----------------------------------------------------------------------------------
    def is_late(self, t_ms: int) -> bool:
        """Whether an event at ``t_ms`` arriving now is late (its 1-minute pane is closed)."""
        return self.watermark >= t_ms - t_ms % MINUTE + MINUTE + self.grace

    def _advance_to(self, t: int) -> None:
        if t > self.watermark:
            self.watermark = t
            self.dirty.watermark = True

    def _gate(self, t: int, offset: int) -> bool | None:
        """``None`` when an event at ``t`` read at ``offset`` is to be applied; else whether it
        is late (``True``, counted late) or a replay of what the checkpoint covers (``False``,
        counted replayed; it still advances the watermark)."""
        if offset <= self.offset:
            self.counters.replayed += 1
            self._advance_to(t)
            return False
        if self.is_late(t):
            self.counters.late += 1
            return True
        return None

    def add_impression(self, event: Mapping[str, Any], offset: int) -> tuple[Exhausted | None, bool]:
        """Apply one ``AdImpressionServed`` read at ``offset``. Returns ``(exhausted, late)``:
        the budget exhaustion it caused (or None) and whether it is late (the caller sends it to
        the late-events topic)."""
        t: int = event["occurred_at"]
        c = self.counters
        passed = self._gate(t, offset)
        if passed is not None:
            return None, passed
        campaign = self.campaigns.by_id[event["campaign_id"]]
        iid: str = event["impression_id"]
        known = self.impressions.get(iid)
        exhausted: Exhausted | None = None
        if known is not None and known.first_offset != offset:
            c.duplicates += 1
            self._advance_to(t)
            return None, False
        if known is None:  # first time: decide over-delivery from the day's budget
            day = t - t % DAY
            budget = self.budgets.get((campaign.campaign_id, day)) or Budget()
            over = budget.exhausted_at is not None
            known = self.impressions[iid] = Impression(
                campaign.campaign_id, str(event["ad_id"]), int(event["position"]), t, over, offset, offset
            )
            self.dirty.impressions.add(iid)
            c.impressions += 1
        else:
            c.replayed += 1
        cost = campaign.impression_micros
        if not known.over:
            exhausted = self._spend(campaign.campaign_id, known.t, t, cost, offset, campaign.budget_micros)
        pane = t - t % MINUTE
        deltas = (
            {"overdelivery_impressions": 1, "overdelivery_spend_micros": cost}
            if known.over
            else {
                "impressions": 1,
                "spend_micros": cost,
            }
        )
        self._add_campaign(known.campaign, pane, deltas, offset)
        self._add_ad(known.campaign, known.item, known.position, pane, deltas, offset)
        self._advance_to(t)
        return exhausted, False

    def add_click(self, event: Mapping[str, Any], offset: int) -> tuple[Exhausted | None, bool]:
        """Apply one ``AdClicked`` read at ``offset``; returns ``(exhausted, late)`` as
        :meth:`add_impression`."""
        t: int = event["occurred_at"]
        c = self.counters
        passed = self._gate(t, offset)
        if passed is not None:
            return None, passed
        cid: str = event["event_id"]
        campaign_id: str = event["campaign_id"]
        imp = self.impressions.get(event["impression_id"])
        exhausted: Exhausted | None = None
        if imp is None:
            self._add_campaign(campaign_id, t - t % MINUTE, {"clicks_unknown_impression": 1}, offset)
            c.clicks += 1
            self._advance_to(t)
            return None, False
        seen = imp.clicks.get(cid)
        if seen is not None and seen[0] != offset:
            c.duplicates += 1
            self._advance_to(t)
            return None, False
        if seen is None:
            kind = "outside" if t - imp.t > self.attribution else ("over" if imp.over else "billed")
            seen = imp.clicks[cid] = [offset, kind]
            imp.offset = offset
            self.dirty.impressions.add(event["impression_id"])
            c.clicks += 1
        else:
            c.replayed += 1
        kind = seen[1]
        campaign = self.campaigns.by_id[imp.campaign]
        if kind == "outside":
            self._add_campaign(campaign_id, t - t % MINUTE, {"clicks_outside_attribution": 1}, offset)
        else:
            cost = campaign.click_micros
            if kind == "billed":
                exhausted = self._spend(imp.campaign, imp.t, t, cost, offset, campaign.budget_micros)
                deltas = {"clicks": 1, "spend_micros": cost}
            else:
                deltas = {"overdelivery_clicks": 1, "overdelivery_spend_micros": cost}
            pane = imp.t - imp.t % MINUTE
            self._add_campaign(imp.campaign, pane, deltas, offset)
            self._add_ad(imp.campaign, imp.item, imp.position, pane, deltas, offset)
        self._advance_to(t)
        return exhausted, False

    def _spend(
        self, campaign: str, day_of: int, t: int, cost: int, offset: int, budget_micros: int
    ) -> Exhausted | None:
        """Add ``cost`` to the budget of the UTC day of ``day_of`` (the impression's time) by the
        event at ``t``; the exhaustion it causes, if any."""
        day = day_of - day_of % DAY
        key = (campaign, day)
        budget = self.budgets.get(key)
        if budget is None:
            budget = self.budgets[key] = Budget()
        if offset <= budget.offset:
            return None
        budget.spent += cost
        budget.offset = offset
        self.dirty.budgets.add(key)
        if budget.exhausted_at is None and budget.spent >= budget_micros:
            budget.exhausted_at = t
            return Exhausted(campaign, day, t, budget_micros, budget.spent)
        return None

    def _add_campaign(self, campaign: str, pane: int, deltas: dict[str, int], offset: int) -> None:
        _add(self.campaign_panes, self.dirty.campaign_panes, (campaign, pane), deltas, offset)

    def _add_ad(
        self, campaign: str, ad: str, position: int, pane: int, deltas: dict[str, int], offset: int
    ) -> None:
        _add(self.ad_panes, self.dirty.ad_panes, (campaign, ad, position, pane), deltas, offset)

    def advance_watermark(self, watermark_ms: int) -> None:
        """Move the watermark to a control record's ``watermark_ms`` if it is later."""
        self._advance_to(watermark_ms)

    # -- closing ---------------------------------------------------------------------------------
    def _final_at(self, spec: HoppingWindows, start: int) -> int:
        return start + spec.size_ms + self.attribution + self.grace

    def _closing(self, spec: HoppingWindows, panes: list[int], before: int, after: int) -> list[int]:
        """Starts of the windows of ``spec`` holding one of ``panes`` that became final when the
        watermark moved from ``before`` to ``after``, oldest first."""
        starts: set[int] = set()
        for pane in panes:
            first = pane - pane % spec.step_ms  # the latest window start holding the pane
            for start in range(first - spec.size_ms + spec.step_ms, first + 1, spec.step_ms):
                if before < self._final_at(spec, start) <= after:
                    starts.add(start)
        return sorted(starts)

    def advance(self) -> list[Report]:
        """The reports of the windows the watermark has made final since the last call (by
        final time, then campaign, ad, position), and drop what no window needs."""
        before, after = self._closed_up_to, self.watermark
        if after <= before:
            return []
        self._closed_up_to = after
        out: list[Report] = []
        by_campaign: dict[str, list[int]] = {}
        for campaign, pane in self.campaign_panes:
            by_campaign.setdefault(campaign, []).append(pane)
        for campaign, panes in by_campaign.items():
            panes.sort()
            for spec in CAMPAIGN_WINDOWS:
                for start in self._closing(spec, panes, before, after):
                    total = [0] * len(FIELDS)
                    # the panes the campaign has in [start, start + size): few, so visit those
                    # rather than every minute of the window
                    for m in panes[bisect_left(panes, start) : bisect_left(panes, start + spec.size_ms)]:
                        pane_entry = self.campaign_panes[(campaign, m)]
                        total = [a + b for a, b in zip(total, pane_entry.counts, strict=True)]
                    if any(total):
                        final = self._final_at(spec, start)
                        out.append(
                            Report(
                                campaign, None, None, spec.size_ms, spec.step_ms, start, tuple(total), final
                            )
                        )
        by_ad: dict[tuple[str, str, int], list[int]] = {}
        for campaign, ad, position, pane in self.ad_panes:
            by_ad.setdefault((campaign, ad, position), []).append(pane)
        for (campaign, ad, position), panes in by_ad.items():
            panes.sort()
            for spec in AD_WINDOWS:
                for start in self._closing(spec, panes, before, after):
                    total = [0] * len(FIELDS)
                    for m in panes[bisect_left(panes, start) : bisect_left(panes, start + spec.size_ms)]:
                        entry = self.ad_panes[(campaign, ad, position, m)]
                        total = [a + b for a, b in zip(total, entry.counts, strict=True)]
                    if any(total):
                        final = self._final_at(spec, start)
                        out.append(
                            Report(
                                campaign, ad, position, spec.size_ms, spec.step_ms, start, tuple(total), final
                            )
                        )
        out.sort(key=lambda r: (r.final_at, r.campaign_id, r.ad_id or "", r.position or 0, r.size_ms))
        self._retire(after)
        return out

    def _retire(self, watermark: int) -> None:
        longest = max(s.size_ms for s in CAMPAIGN_WINDOWS)
        d = self.dirty
        for key in [
            k for k in self.campaign_panes if watermark >= k[1] + longest + self.attribution + self.grace
        ]:
            del self.campaign_panes[key]
            d.campaign_panes.discard(key)
            d.dropped_campaign_panes.add(key)
        for akey in [k for k in self.ad_panes if watermark >= k[3] + longest + self.attribution + self.grace]:
            del self.ad_panes[akey]
            d.ad_panes.discard(akey)
            d.dropped_ad_panes.add(akey)
        horizon = 2 * self.attribution + MINUTE + self.grace
        for iid in [i for i, imp in self.impressions.items() if watermark >= imp.t + horizon]:
            del self.impressions[iid]
            d.impressions.discard(iid)
            d.dropped_impressions.add(iid)
        for bkey in [k for k in self.budgets if watermark >= k[1] + 2 * DAY]:
            del self.budgets[bkey]  # a day long gone: no event can reach it without being late
            d.budgets.discard(bkey)
            d.dropped_budgets.add(bkey)

    def take_dirty(self) -> Dirty:
        """What changed since the last call (and reset it)."""
        dirty, self.dirty = self.dirty, Dirty()
        return dirty

    @classmethod
    def restored(
        cls,
        partition: int,
        campaigns: Campaigns,
        grace_ms: int,
        attribution_ms: int,
        watermark: int,
        offset: int,
        campaign_panes: dict[CampaignPaneKey, Pane],
        ad_panes: dict[AdPaneKey, Pane],
        impressions: dict[str, Impression],
        budgets: dict[BudgetKey, Budget],
    ) -> AdPartition:
        """A partition from checkpointed state (what the watermark has retired is dropped)."""
        ap = cls(partition, campaigns, grace_ms, attribution_ms)
        ap.watermark = watermark
        ap.offset = offset
        ap._closed_up_to = watermark
        ap.campaign_panes = dict(campaign_panes)
        ap.ad_panes = dict(ad_panes)
        ap.impressions = dict(impressions)
        ap.budgets = dict(budgets)
        ap._retire(watermark)
        ap.dirty = Dirty()
        return ap


def _add(panes: dict[Any, Pane], dirty: set[Any], key: Any, deltas: dict[str, int], offset: int) -> None:
    """Add ``deltas`` (counter name → amount) to the pane at ``key`` unless it already applied
    the event at ``offset``; mark it dirty."""
    pane = panes.get(key)
    if pane is None:
        pane = panes[key] = Pane()
    if offset <= pane.offset:
        return
    for name, value in deltas.items():
        pane.counts[_IDX[name]] += value
    pane.offset = offset
    dirty.add(key)


def minor(micros: int) -> int:
    """Micros → minor units, rounded down."""
    return micros // MICROS
