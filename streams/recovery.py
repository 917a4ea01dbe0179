"""Faust table recovery that reads changelog ends from Fetch responses (TANSU.md §2).

Stock Faust recovers a table by reading its changelog up to the ``end_offsets`` it gets from
ListOffsets; the embedded broker answers ListOffsets LATEST with the base offset of the last
batch + 1, so recovery can stop before the last records and lose state. :class:`FetchRecovery`
builds the high watermarks with :func:`events.offsets.high_watermarks` instead (a throw-away
consumer seeks to end-1 and reads the high watermark of the Fetch response); on real Kafka this
is what ListOffsets returns, so it is kept there too. :class:`FetchTableManager` installs it
(app setting ``TableManager=``).

Every recovery logs, per table, the changelog records it read and (after ``--reset-state``, see
:mod:`streams.reset`) the keys the table holds: ``table recovery: <table>: read N changelog
records from P partitions[, K keys]``. After a reset (``app.reset_state``) the first recovery of
the process ignores persisted offsets, so every changelog is read from its first record.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Set

from faust.tables.manager import TableManager
from faust.tables.recovery import Recovery
from faust.types import TP, CollectionT, ConsumerT

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


def _offset(value: int | None) -> int:
    return -1 if value is None else value


class FetchRecovery(Recovery):
    """Faust's :class:`Recovery` with changelog ends taken from Fetch responses, a log line per
    table after each recovery, and a full recovery after ``--reset-state``."""

    _reading_from: dict[TP, int] | None = None

    def _full_recovery_pending(self) -> bool:
        return bool(getattr(self.app, "reset_state", False)) and not getattr(self, "_reset_done", False)

    def _add(self, table: CollectionT, tp: TP, offsets: Counter[TP]) -> None:
        super()._add(table, tp, offsets)
        if self._full_recovery_pending() and offsets is self.active_offsets and offsets[tp] is not None:
            self.log.info("reset-state: ignoring persisted offset %s of %s", offsets[tp], tp)
            offsets[tp] = None  # type: ignore[assignment]  # Faust's "nothing persisted"

    async def _build_offsets(
        self, consumer: ConsumerT, tps: Set[TP], destination: Counter[TP], title: str
    ) -> None:
        await super()._build_offsets(consumer, tps, destination, title)
        if title == "active":
            self._reading_from = {tp: destination[tp] for tp in tps}

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        """Log what each table's recovery read, then Faust's completion."""
        start = self._reading_from or {}
        reset = self._full_recovery_pending()
        for table, tps in self.actives_for_table.items():
            tps = {tp for tp in tps if tp in start}
            if not tps:
                continue
            read = sum(max(0, _offset(self.active_offsets.get(tp)) - _offset(start[tp])) for tp in tps)
            keys = f", {len(table.data)} keys" if reset else ""
            self.log.info(
                "table recovery: %s: read %d changelog records from %d partitions%s%s",
                table.name, read, len(tps), keys, " (full, after --reset-state)" if reset else "",
            )
        self._reading_from = None
        await super().on_recovery_completed(generation_id)
        if reset:
            self._reset_done = True

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
