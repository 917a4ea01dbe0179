"""``python -m sagas.clock`` / ``backbeat sagas clock``: the business clock of a live run.

It publishes ``ClockTicked`` on ``platform.clock`` every ``interval_s`` seconds of wall time, the
business time running ``speed`` times faster than the wall clock (default 86,400: one day per
second, so a monthly subscription renews every 30 s). The orchestrator acts on each tick
(:mod:`sagas.renewal`). Unlike the lockstep simulation (:mod:`sagas.subscription_sim`), nobody
waits for the orchestrator: what is due is acted on at the first tick at or after it, and the
business times recorded are still the due times, so the events do not depend on the pace.

Business time starts at ``start_ms`` (default: the wall clock at start) or, when the topic already
has ticks, continues from the last one (a restarted clock never goes back); tick numbers continue
likewise. Runs under :func:`infra.lifecycle.run_process` as process ``business-clock`` (``/metrics``
and ``/health``; metrics component ``business-clock``: ticks out, the business now), until
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Sequence

from events.offsets import high_watermarks
from infra import metrics
from infra.errors import ConfigError
from infra.lifecycle import LoopService, run_process
from infra.logs import setup_logging
from infra.ops import add_port_argument, port_setting
from infra.settings import Settings
from sagas.renewal import CLOCK_TOPIC

PROCESS = COMPONENT = "business-clock"
SOURCE = "/sagas/clock"


def last_tick(settings: Settings) -> tuple[int, int] | None:
    """``(tick, occurred_at ms)`` of the last ``ClockTicked`` on ``platform.clock``, or ``None``
    when the topic is empty.

    Raises:
        InfraError, TransientError: the broker or registry cannot be reached.
    """
    from events.log import read_range
    from events.registry_client import registry_for

    high = high_watermarks(settings, CLOCK_TOPIC).get(0, 0)
    if high == 0:
        return None
    decoder = registry_for(settings.registry_url).decoder()
    last: tuple[int, int] | None = None
    for batch in read_range(settings, {(CLOCK_TOPIC, 0): (high - 1, high)}, purpose="clock"):
        for msg in batch:
            event = decoder.decode(msg.value())
            last = (int(event["tick"]), int(event["occurred_at"]))
    return last


class LiveClock:
    """Ticks the business clock (module doc). ``speed``: business ms per wall ms (> 0);
    ``interval_s``: wall seconds between ticks (> 0); ``start_ms``: business start (ms since the
    epoch; default the wall clock).

    Raises (constructor):
        ConfigError: ``speed`` or ``interval_s`` not positive.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock_id: str = "live",
        speed: float = 86_400.0,
        interval_s: float = 1.0,
        start_ms: int | None = None,
    ) -> None:
        if speed <= 0 or interval_s <= 0:
            raise ConfigError(f"--speed ({speed}) and --interval-s ({interval_s}) must be > 0")
        self.settings = settings
        self.clock_id = clock_id
        self.speed = speed
        self.interval_s = interval_s
        self.start_ms = start_ms
        self.ticks = 0
        self.now_ms = 0
        self._stop = threading.Event()

    def run(self) -> None:
        """Tick until :meth:`stop`."""
        from events.producer import EventProducer

        producer = EventProducer(self.settings)
        last = last_tick(self.settings)
        number = last[0] if last else 0
        base = max(self.start_ms or int(time.time() * 1000), last[1] if last else 0)
        began = time.monotonic()
        try:
            while not self._stop.is_set():
                now = base + int((time.monotonic() - began) * 1000 * self.speed)
                number += 1
                tick = {"event_id": f"{self.clock_id}-{number}-{now}", "clock_id": self.clock_id,
                        "tick": number, "occurred_at": now}  # fmt: skip
                producer.send_many(CLOCK_TOPIC, "ClockTicked", [tick], key_field="clock_id",
                                   time_field="occurred_at", source=SOURCE)  # fmt: skip
                producer.flush()
                self.ticks += 1
                self.now_ms = now
                self._stop.wait(self.interval_s)  # the pace of the clock, not synchronisation
        finally:
            producer.flush()

    def stop(self) -> None:
        """End :meth:`run` before its next tick (any thread)."""
        self._stop.set()

    def observe(self) -> metrics.Observation:
        """Ticks produced (``records_out``) and the business now (``detail``)."""
        return metrics.Observation(
            records_out={CLOCK_TOPIC: self.ticks}, ready=self.ticks > 0,
            detail={"business_now_ms": self.now_ms, "speed": self.speed},
        )  # fmt: skip


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sagas.clock", description=__doc__.split("\n\n")[0])
    parser.add_argument("--speed", type=float, default=86_400.0, help="business ms per wall ms")
    parser.add_argument("--interval-s", type=float, default=1.0, help="wall seconds between ticks")
    parser.add_argument("--start-ms", type=int, default=None, help="business start, ms since the epoch")
    parser.add_argument("--clock-id", default="live", help="the clock's id (default %(default)s)")
    add_port_argument(parser, PROCESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0; 1 when the loop failed; 2 for a bad setting)."""
    args = _parse(argv)
    try:
        setup_logging(PROCESS)
        ops_port = port_setting(PROCESS, args.ops_port)
        settings = Settings.from_env()
        clock = LiveClock(settings, clock_id=args.clock_id, speed=args.speed, interval_s=args.interval_s,
                          start_ms=args.start_ms)  # fmt: skip
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics.register(COMPONENT, clock.observe)
    try:
        return run_process(PROCESS, [LoopService(COMPONENT, clock.run, clock.stop)], ops_port=ops_port,
                           run_dir=settings.run_dir)  # fmt: skip
    finally:
        metrics.unregister(COMPONENT)


if __name__ == "__main__":
    raise SystemExit(main())
