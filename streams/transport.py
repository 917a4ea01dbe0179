"""The aiokafka transport of Faust with a configurable consumer fetch wait and a leaner drain loop.

Faust hard-codes ``fetch_max_wait_ms=1500`` for its worker consumer; on the embedded broker an
idle Fetch sleeps that long, so every hop on a quiet stream costs 0.4-0.7 s (TANSU.md §7).
:class:`FetchWaitTransport` sets the wait of the aiokafka consumer it creates (the private
``_fetch_max_wait_ms`` attribute, read when the consumer starts; pinned aiokafka 0.14), and its
consumer hands messages to the conductor without creating two tasks per message (measured: the
ingest agent went from ~9.7k to ~17k listens/s). Both override private Faust/aiokafka internals
of the pinned versions (faust-streaming 0.15.3, aiokafka 0.14); re-check them on upgrade.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiokafka
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread, Consumer, Transport

from streams.delivery import LeanConductor


class FetchWaitConsumerThread(AIOKafkaConsumerThread):
    """The consumer thread whose worker consumer waits at most ``app.conf`` fetch wait."""

    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        wait_ms = getattr(self.app, "fetch_wait_ms", None)
        if wait_ms:
            consumer._fetch_max_wait_ms = int(wait_ms)
        return consumer


class FetchWaitConsumer(Consumer):
    """Faust's aiokafka consumer using :class:`FetchWaitConsumerThread`, with a leaner
    message drain loop (:meth:`_drain_messages`)."""

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover
        # Faust's loop, minus one thing: it hands every message to the conductor through
        # ``wait_first(callback(message), suspend_flow.wait())``, which creates two tasks per
        # message (most of the per-message cost of a worker). Here the callback is awaited
        # directly while the flow is not suspended; during a suspension (rebalance) Faust's
        # original interruptible form is used.
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        suspended = self.suspend_flow.is_set
        acks_enabled_for = self.app.topics.acks_enabled_for
        commit_every = self._commit_every
        sleep = asyncio.sleep
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                ait = getmany(timeout=1.0)
                await sleep(0)
                if self.should_stop:
                    continue
                n = 0
                async for tp, message in ait:
                    n += 1
                    if n > 1000:
                        await sleep(0)
                        n = 0
                    offset = message.offset
                    r_offset = get_read_offset(tp)
                    if r_offset is not None and offset < r_offset:
                        continue
                    gap = offset - (r_offset or 0)
                    if gap > 1 and r_offset and acks_enabled_for(message.topic):
                        await self._add_gap(tp, r_offset + 1, offset)
                    if commit_every is not None and self._n_acked >= commit_every:
                        self._n_acked = 0
                        await self.commit()
                    if suspended():
                        await self.wait_first(callback(message), self.suspend_flow.wait())
                    else:
                        await callback(message)
                    set_read_offset(tp, offset)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return FetchWaitConsumerThread(self, loop=self.loop, beacon=self.beacon)


class FetchWaitTransport(Transport):
    """Faust's aiokafka transport using :class:`FetchWaitConsumer` and
    :class:`streams.delivery.LeanConductor`."""

    Consumer = FetchWaitConsumer
    Conductor = LeanConductor

