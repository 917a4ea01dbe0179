"""Checkpoint records of the ad-reporting agent, pure Python (the scheme of
:mod:`streams.features_state`).

Keys (UTF-8; ids come last so they may hold ``:``), values compact JSON:

* ``m:<p>:<impression_id>`` → ``[offset, first_offset, campaign, ad, position, t_ms, over,
  {click_event_id: [offset, decision]}]`` — written first: the decisions others follow;
* ``b:<p>:<day_start>:<campaign>`` → ``[offset, spent_micros, exhausted_at_ms | null]``;
* ``c:<p>:<pane_start>:<campaign>`` → ``[offset, [counters…]]`` (``ad_reporting.FIELDS`` order);
* ``a:<p>:<pane_start>:<position>:<ad>:<campaign>`` → ``[offset, [counters…]]`` (campaign ids
  hold no ``:``);
* ``w:<p>`` → ``[watermark_ms, source_offset]``; then tombstones of dropped entries.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from events.campaigns import Campaigns
from streams.ad_reporting import AdPartition, Budget, Impression, Pane

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_loads = json.loads

Record = tuple[bytes, bytes | None]


def records(ap: AdPartition, offset: int) -> list[Record]:
    """The checkpoint records of what changed in ``ap`` (consumes its dirty sets), in the order
    the module docstring gives; the partition record covers source ``offset``."""
    d = ap.take_dirty()
    p = ap.partition
    out: list[Record] = []
    for iid in d.impressions:
        m = ap.impressions[iid]
        value = [m.offset, m.first_offset, m.campaign, m.item, m.position, m.t, m.over, m.clicks]
        out.append((f"m:{p}:{iid}".encode(), _dumps(value).encode()))
    for campaign, day in d.budgets:
        b = ap.budgets[(campaign, day)]
        out.append((f"b:{p}:{day}:{campaign}".encode(), _dumps([b.offset, b.spent, b.exhausted_at]).encode()))
    for campaign, pane in d.campaign_panes:
        c = ap.campaign_panes[(campaign, pane)]
        out.append((f"c:{p}:{pane}:{campaign}".encode(), _dumps([c.offset, c.counts]).encode()))
    for campaign, ad, position, pane in d.ad_panes:
        a = ap.ad_panes[(campaign, ad, position, pane)]
        out.append(
            (f"a:{p}:{pane}:{position}:{ad}:{campaign}".encode(), _dumps([a.offset, a.counts]).encode())
        )
    dropped = d.dropped_impressions or d.dropped_campaign_panes or d.dropped_ad_panes or d.dropped_budgets
    if out or d.watermark or dropped:
        ap.offset = max(ap.offset, offset)
        out.append((f"w:{p}".encode(), _dumps([ap.watermark, ap.offset]).encode()))
    out += [(f"m:{p}:{iid}".encode(), None) for iid in d.dropped_impressions]
    out += [(f"b:{p}:{day}:{c}".encode(), None) for c, day in d.dropped_budgets]
    out += [(f"c:{p}:{pane}:{c}".encode(), None) for c, pane in d.dropped_campaign_panes]
    out += [(f"a:{p}:{pane}:{pos}:{ad}:{c}".encode(), None) for c, ad, pos, pane in d.dropped_ad_panes]
    return out


def restore(
    partition: int,
    items: Iterable[tuple[bytes, bytes | None]],
    campaigns: Campaigns,
    grace_ms: int,
    attribution_ms: int,
) -> AdPartition:
    """An :class:`~streams.ad_reporting.AdPartition` for ``partition`` from table ``items``.

    Raises:
        ValueError: a value of this partition cannot be decoded.
    """
    watermark, offset = -1, -1
    cpanes: dict[tuple[str, int], Pane] = {}
    apanes: dict[tuple[str, str, int, int], Pane] = {}
    imps: dict[str, Impression] = {}
    budgets: dict[tuple[str, int], Budget] = {}
    wkey = f"w:{partition}".encode()
    mid = f":{partition}:"
    for raw_key, raw in items:
        if raw is None:
            continue
        if raw_key == wkey:
            watermark, offset, *_ = _loads(raw)
            continue
        key = raw_key.decode()
        kind, rest = key[:1], key[1:]
        if not rest.startswith(mid):
            continue
        rest = rest[len(mid) :]
        if kind == "m":
            off, first, campaign, ad, position, t, over, clicks = _loads(raw)
            imps[rest] = Impression(campaign, ad, position, t, over, first, off, clicks)
        elif kind == "b":
            day, campaign = rest.split(":", 1)
            off, spent, exhausted = _loads(raw)
            budgets[(campaign, int(day))] = Budget(off, spent, exhausted)
        elif kind == "c":
            pane, campaign = rest.split(":", 1)
            off, counts = _loads(raw)
            cpanes[(campaign, int(pane))] = Pane(off, counts)
        elif kind == "a":
            pane, position, ad, campaign = rest.split(":", 3)
            off, counts = _loads(raw)
            apanes[(campaign, ad, int(position), int(pane))] = Pane(off, counts)
    return AdPartition.restored(
        partition,
        campaigns,
        grace_ms,
        attribution_ms,
        watermark,
        offset,
        cpanes,
        apanes,
        imps,
        budgets,
    )
