"""Faust table recovery that reads changelog ends from Fetch responses (TANSU.md §2).

Stock Faust recovers a table by reading its changelog up to the ``end_offsets`` it gets from
ListOffsets; the embedded broker answers ListOffsets LATEST with the base offset of the last
batch + 1, so recovery can stop before the last records and lose state. :class:`FetchRecovery`
builds the high watermarks with :func:`events.offsets.high_watermarks` instead (a throw-away
consumer seeks to end-1 and reads the high watermark of the Fetch response); on real Kafka this
is what ListOffsets returns, so it is kept there too. :class:`FetchTableManager` installs it
(app setting ``TableManager=``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Set

from faust.tables.manager import TableManager
from faust.tables.recovery import Recovery
from faust.types import TP, ConsumerT

from events.offsets import high_watermarks
from infra.settings import Settings


def fetch_highwaters(settings: Settings, tps: Set[TP]) -> dict[TP, int]:
    """``{tp: high watermark}`` for ``tps`` from Fetch responses (blocking; one pass per topic).

    Raises:
        InfraError: a topic is missing or a partition does not answer.
    """
    out: dict[TP, int] = {}
    for topic in {tp.topic for tp in tps}:
        marks = high_watermarks(settings, topic)
        for tp in tps:
            if tp.topic == topic:
                out[tp] = marks[tp.partition]
    return out


class FetchRecovery(Recovery):
    """Faust's :class:`Recovery` with changelog ends taken from Fetch responses."""

    async def _build_highwaters(
        self, consumer: ConsumerT, tps: Set[TP], destination: Counter[TP], title: str
    ) -> None:
        settings = getattr(self.app, "backbeat_settings", None) or Settings.from_env()
        marks = await asyncio.to_thread(fetch_highwaters, settings, tps) if tps else {}
        # Faust's convention: the offset of the last record (high watermark - 1), -1 when empty
        highwaters = {tp: value - 1 for tp, value in marks.items()}
        self.log.info(
            "Highwater (from Fetch) for %s changelog partitions:\n%s",
            title,
            self._highwater_logtable(highwaters, title=title),
        )
        destination.clear()
        destination.update(highwaters)


class FetchTableManager(TableManager):
    """The table manager whose recovery is :class:`FetchRecovery`."""

    @property
    def recovery(self) -> Recovery:
        """The recovery service (created on first use, like Faust's)."""
        if self._recovery is None:
            self._recovery = FetchRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery
