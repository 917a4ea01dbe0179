"""The ad campaigns (``infra/campaigns.toml``): which ads (Open Bandit items) belong to which
campaign, their prices (CPM, CPC) and daily budgets. Read by the ads importer and the
ad-reporting agent; pure data, no I/O beyond reading the file.

Money is integer minor units (docs/design.md §4); spend is computed exactly in *micros* (millionths of
a minor unit): an impression costs ``cpm_minor * 1000`` micros, a click ``cpc_minor * 10**6``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from infra.errors import ConfigError
from infra.resources import CAMPAIGNS_FILE

MICROS = 1_000_000


@dataclass(frozen=True)
class Campaign:
    """One campaign: its ads (item ids), prices in minor units and daily budget."""

    campaign_id: str
    items: tuple[int, ...]
    cpm_minor: int
    cpc_minor: int
    daily_budget_minor: int
    currency: str

    @property
    def impression_micros(self) -> int:
        """Price of one impression in micros (``cpm_minor / 1000`` minor units)."""
        return self.cpm_minor * 1000

    @property
    def click_micros(self) -> int:
        """Price of one click in micros."""
        return self.cpc_minor * MICROS

    @property
    def budget_micros(self) -> int:
        """Daily budget in micros."""
        return self.daily_budget_minor * MICROS


@dataclass(frozen=True)
class Campaigns:
    """All campaigns, by id and by item."""

    by_id: dict[str, Campaign]
    by_item: dict[int, Campaign]

    def for_item(self, item_id: int) -> Campaign:
        """The campaign of ``item_id``.

        Raises:
            ConfigError: no campaign holds the item.
        """
        try:
            return self.by_item[item_id]
        except KeyError:
            raise ConfigError(f"no campaign in the campaigns file holds item {item_id}") from None


def parse_campaigns(text: str, source: str = "campaigns") -> Campaigns:
    """Campaigns from TOML text (``[[campaign]]`` tables, see ``infra/campaigns.toml``).

    Raises:
        ConfigError: malformed TOML, a missing or negative field, a duplicate campaign, or an
            item in two campaigns (the message names it).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    by_id: dict[str, Campaign] = {}
    by_item: dict[int, Campaign] = {}
    for i, raw in enumerate(data.get("campaign", [])):
        try:
            campaign = Campaign(
                campaign_id=str(raw["campaign_id"]),
                items=tuple(int(x) for x in raw["items"]),
                cpm_minor=int(raw["cpm_minor"]),
                cpc_minor=int(raw["cpc_minor"]),
                daily_budget_minor=int(raw["daily_budget_minor"]),
                currency=str(raw["currency"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: campaign #{i + 1} is missing or has a bad field: {exc}") from exc
        if min(campaign.cpm_minor, campaign.cpc_minor, campaign.daily_budget_minor) < 0:
            raise ConfigError(f"{source}: campaign {campaign.campaign_id} has a negative price or budget")
        if campaign.campaign_id in by_id:
            raise ConfigError(f"{source}: campaign {campaign.campaign_id} is declared twice")
        by_id[campaign.campaign_id] = campaign
        for item in campaign.items:
            if item in by_item:
                raise ConfigError(
                    f"{source}: item {item} is in {by_item[item].campaign_id} and {campaign.campaign_id}"
                )
            by_item[item] = campaign
    if not by_id:
        raise ConfigError(f"{source}: no [[campaign]] entries")
    return Campaigns(by_id, by_item)


@cache
def load_campaigns(path: Path = CAMPAIGNS_FILE) -> Campaigns:
    """The campaigns of ``path`` (default ``infra/campaigns.toml``), cached.

    Raises:
        ConfigError: unreadable or malformed file.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the campaigns file {path}: {exc}") from exc
    return parse_campaigns(text, str(path))
