"""A leaner Faust delivery path for raw-bytes topics: conductor → channel queue → ``take_events``.

Faust's per-message path costs ~45 µs per event on the ingest agent, several times the agent's
own work: for every message the conductor takes a lock, runs the topic's schema (a registry
round-trip that returns the same bytes for ``raw`` serializers), and when the stream queue is
full it hands the event over through ``asyncio.wait([ensure_future(...)])`` (a task per
message); on the stream side ``take_events`` runs a passive drainer task that pulls each event
through the Cython stream iterator (an ``await asyncio.sleep(0)`` event-loop round per event)
and a buffering processor coroutine. This module keeps Faust's semantics and removes that work:

* :class:`LeanConductor` (installed by :class:`streams.transport.FetchWaitTransport`) reads its
  tp → handler map without the lock while no update holds it, and builds :class:`RawTopicHandler`
  for a partition whose subscribers are all ``raw``/``raw`` topics (e.g. the listening-ingest
  and user-features agents on ``playback.listens``): it waits for flow control and the producer
  buffer (``ProducerBuffer.pending``) like Faust's handler, and for each subscriber increments
  the message refcount, creates a :class:`faust.Event` from the message's bytes (what the raw
  schema would produce) and puts it on that channel's queue with the same pressure callbacks
  (pause/resume fetching of the partition); a full queue is awaited directly instead of
  through a task. The message is acked (and its offset committable) once every subscriber has
  acked its event, as with Faust's handler. Any other topic keeps Faust's handler.
* :class:`BatchStream` (the app's ``Stream`` setting) overrides ``take_events`` to drain the
  channel queue in bulk: each event is checked exactly as Faust's stream iterator does (dropped
  when flow control is suspended or the message's generation is stale; tracked as unacked with
  ``on_message_in``; ``on_stream_event_in`` sensors), a batch is yielded when ``max_`` events
  are buffered or ``within`` seconds have passed, and after the consumer has processed it every
  event is acked as :meth:`faust.Stream.ack` does (so Faust commits offsets only after
  processing). Streams with processors, joins or combinations fall back to Faust's method.

Both override private internals of faust-streaming 0.15.3 (``Conductor._build_handler``,
``Conductor._compile_message_handler``, ``Conductor._tp_to_callback(_lock)``, the queue's
``put_nowait_enhanced``/``_errors``, ``Stream._active_agens``, ``Stream._on_*`` sensor hooks,
``Consumer._unacked_messages``, ``TopicManager._acking_topics``, ``Message.tracked/refcount``,
``ProducerBuffer.pending/max_messages``);
re-check them on upgrade.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, MutableSet, Sequence
from typing import Any

import faust
from faust.events import Event
from faust.serializers.schemas import Schema
from faust.transport.conductor import Conductor
from faust.types import TP, ChannelT, EventT

__all__ = ["BatchStream", "LeanConductor", "RawTopicHandler"]


def _is_raw_topic(channel: Any) -> bool:
    schema = getattr(channel, "schema", None)
    return (
        type(schema) is Schema
        and schema.key_type is None
        and schema.value_type is None
        and schema.key_serializer == "raw"
        and schema.value_serializer == "raw"
    )


class RawTopicHandler:
    """Delivers the messages of one topic partition to its subscribers, all raw topics."""

    def __init__(self, conductor: Conductor, tp: TP, channels: Sequence[Any]) -> None:
        app = conductor.app
        self.tp = tp
        self.channels = tuple(channels)
        self.app = app
        self.flow_control = app.flow_control
        buffer = app.producer.buffer
        self.wait_until_producer_ebb = buffer.wait_until_ebb
        # ProducerBuffer.size reads app.conf per call; unthreaded, it is the pending queue's size
        self.pending = None if app.conf.producer_threaded else buffer.pending
        self.max_pending = buffer.max_messages
        self.on_topic_buffer_full = app.sensors.on_topic_buffer_full
        self.consumer_on_buffer_full = app.consumer.on_buffer_full
        self.consumer_on_buffer_drop = app.consumer.on_buffer_drop
        # bound once: ``put_nowait_enhanced`` takes them per message (and keeps a pending one)
        self._pressure_high = self.on_pressure_high
        self._pressure_drop = self.on_pressure_drop

    def on_pressure_high(self) -> None:
        """The queue is nearly full: stop fetching this partition."""
        self.on_topic_buffer_full(self.tp)
        self.consumer_on_buffer_full(self.tp)

    def on_pressure_drop(self) -> None:
        """The queue has drained: fetch this partition again."""
        self.consumer_on_buffer_drop(self.tp)

    async def __call__(self, message: Any) -> None:
        if not self.flow_control.is_active():
            await self.flow_control.acquire()
        pending = self.pending
        if pending is None or pending.qsize() > self.max_pending:
            await self.wait_until_producer_ebb()
        for channel in self.channels:
            message.refcount += 1  # message.incref(1)
            event = Event(self.app, message.key, message.value, message.headers, message)
            queue = channel.queue
            if queue.full():
                self.on_topic_buffer_full(self.tp)
                await channel.put(event)
            else:
                queue.put_nowait_enhanced(
                    event, on_pressure_high=self._pressure_high, on_pressure_drop=self._pressure_drop
                )


class LeanConductor(Conductor):
    """Faust's conductor with :class:`RawTopicHandler` for raw topics and a lock-free lookup."""

    def _build_handler(self, tp: TP, channels: MutableSet[Any]) -> Any:
        if channels and self.app.conf.Event is Event and all(_is_raw_topic(c) for c in channels):
            return RawTopicHandler(self, tp, sorted(channels, key=id))
        return super()._build_handler(tp, channels)

    def _compile_message_handler(self) -> Any:
        if self.app.client_only:
            return super()._compile_message_handler()
        get_callback_for_tp = self._tp_to_callback.__getitem__
        lock = self._tp_to_callback_lock

        async def on_message(message: Any) -> None:
            if lock.locked():  # the map is being rebuilt (rebalance): wait like Faust
                async with lock:
                    callback = get_callback_for_tp(message.tp)
            else:
                callback = get_callback_for_tp(message.tp)
            return await callback(message)

        return on_message


class BatchStream(faust.Stream):
    """A Faust stream whose ``take_events`` drains the channel queue in bulk (module docstring)."""

    def take_events(self, max_: int, within: Any) -> AsyncGenerator[Sequence[EventT], None]:
        channel = aiter(self.channel)
        if (
            not isinstance(channel, ChannelT)
            or self._processors
            or self.combined
            or self.join_strategy is not None
        ):
            return super().take_events(max_, within)
        agen = self._drain_batches(channel, max_, float(within))
        self._active_agens.add(agen)
        return agen

    async def _drain_batches(
        self, channel: Any, max_: int, within: float
    ) -> AsyncGenerator[Sequence[EventT], None]:
        await self.maybe_start()
        app = self.app
        queue = channel.queue
        get_nowait = queue.get_nowait
        empty = queue.empty
        is_active = app.flow_control.is_active
        acking_topics = app.topics._acking_topics
        add_unacked = app.consumer._unacked_messages.add
        on_message_in = self._on_message_in
        on_stream_event_in = self._on_stream_event_in
        on_stream_event_out = self._on_stream_event_out
        on_message_out = self._on_message_out
        monotonic = time.monotonic
        events: list[EventT] = []
        states: list[Any] = []
        add = events.append
        add_state = states.append
        while not self.should_stop:
            deadline = monotonic() + within
            while len(events) < max_:
                if empty():
                    remaining = deadline - monotonic()
                    if remaining <= 0:
                        break
                    try:
                        event = await asyncio.wait_for(queue.get(), timeout=remaining)
                    except TimeoutError:
                        break
                    except StopAsyncIteration:
                        # Faust stops a stream by throwing this into the queue's getter; its own
                        # iterator ends there, so does this one (events not yielded stay unacked)
                        return
                else:
                    event = get_nowait()
                message = event.message
                if not is_active() or message.generation_id != app.consumer_generation_id:
                    continue  # stale (rebalance): dropped unacked, as Faust's iterator does
                tp = message.tp
                offset = message.offset
                if message.topic in acking_topics and not message.tracked:
                    message.tracked = True
                    add_unacked(message)
                    on_message_in(tp, offset, message)
                add_state(on_stream_event_in(tp, offset, self, event))
                add(event)
            if not events:
                continue
            batch = list(events)
            self.events_total += len(batch)
            try:
                yield batch
            finally:
                # what Stream.ack does per event, with the sensor state of on_stream_event_in
                for event, state in zip(batch, states, strict=True):
                    message = event.message
                    last_stream_to_ack = event.ack()
                    on_stream_event_out(message.tp, message.offset, self, event, state)
                    if last_stream_to_ack:
                        on_message_out(message.tp, message.offset, message)
                events.clear()
                states.clear()
