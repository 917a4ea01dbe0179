"""``backbeat notifications``: run the notification relay, ask for a notification by hand, request
new-release notifications for the followers of released albums, and show the read model
(registered by :mod:`infra.cli`).

A thin shell: the work is in :mod:`sagas.notifications` (relay), :mod:`sagas.new_releases`
(requester) and :mod:`sagas.notification_model` (read model).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from infra.console import console, table
from infra.errors import ConfigError
from infra.settings import get_settings

_CHANNELS = ("EMAIL", "PUSH", "SMS", "IN_APP", "OTHER")
_PRIORITIES = ("LOW", "NORMAL", "HIGH")


def register(app: typer.Typer) -> None:
    """Add the ``notifications`` command group to the ``backbeat`` app."""
    group = typer.Typer(
        help=(
            "Notifications: the relay (NotificationRequested → provider → NotificationSent/Failed on "
            "platform.notifications) with a token bucket per user and channel, manual requests, and "
            "new-release requests for the followers of an album's artist."
        ),
        no_args_is_help=True,
        rich_markup_mode="markdown",
    )
    app.add_typer(group, name="notifications")
    group.command("relay")(relay)
    group.command("request")(request)
    group.command("releases")(releases)
    group.command("status")(status)
    group.command("reset")(reset)


def relay(
    capacity: Annotated[
        int | None,
        typer.Option(help="Tokens per user and channel (default BACKBEAT_NOTIFY_CAPACITY, else 5)."),
    ] = None,
    refill_per_s: Annotated[
        float | None,
        typer.Option(help="Tokens added per second (default BACKBEAT_NOTIFY_REFILL_PER_S, else 0.1)."),
    ] = None,
    max_attempts: Annotated[
        int | None,
        typer.Option(help="Provider calls before giving up (default BACKBEAT_NOTIFY_MAX_ATTEMPTS, else 8)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the provider simulator's faults.")] = 0,
    invalid_address: Annotated[float, typer.Option(help="Share of notifications rejected for good.")] = 0.02,
    unsubscribed: Annotated[float, typer.Option(help="Share of recipients unsubscribed.")] = 0.01,
    throttle: Annotated[
        float, typer.Option(help="Share of provider calls answered 429 (Retry-After).")
    ] = 0.05,
    error: Annotated[float, typer.Option(help="Share of provider calls answered 503 (Retry-After).")] = 0.02,
    lost_answer: Annotated[float, typer.Option(help="Share of deliveries whose answer is lost.")] = 0.02,
    ops_port: Annotated[
        str | None, typer.Option(help="Port of /metrics and /health (default BACKBEAT_OPS_PORT, else 9465).")
    ] = None,
) -> None:
    """Run the notification relay until Ctrl-C / SIGTERM (the provider is the seeded simulator,
    its delivery log in BACKBEAT_DATA_DIR/notifications/provider.sqlite)."""
    from sagas.notifications import main

    argv = ["--seed", str(seed), "--invalid-address", str(invalid_address),
            "--unsubscribed", str(unsubscribed), "--throttle", str(throttle), "--error", str(error),
            "--lost-answer", str(lost_answer)]  # fmt: skip
    for flag, value in (("--capacity", capacity), ("--refill-per-s", refill_per_s),
                        ("--max-attempts", max_attempts), ("--ops-port", ops_port)):  # fmt: skip
        if value is not None:
            argv += [flag, str(value)]
    code = main(argv)
    if code:
        raise typer.Exit(code)


def request(
    user: Annotated[str, typer.Argument(help="The recipient's user id.")],
    template: Annotated[str, typer.Option(help="Template name and version.")] = "hello@1",
    channel: Annotated[str, typer.Option(help="EMAIL, PUSH, SMS, IN_APP or OTHER.")] = "EMAIL",
    priority: Annotated[str, typer.Option(help="LOW, NORMAL or HIGH.")] = "NORMAL",
    param: Annotated[
        list[str] | None, typer.Option(help="Template parameter KEY=VALUE (repeatable).")
    ] = None,
    notification_id: Annotated[
        str | None, typer.Option("--id", help="Notification id (the idempotency key; default: a new one).")
    ] = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the final event (0 = don't).")] = 0.0,
) -> None:
    """Ask for one notification (publish `NotificationRequested`); the relay must be running to
    deliver it. The same `--id` twice is delivered once."""
    from events.producer import EventProducer
    from sagas.messages import stable_id

    channel, priority = channel.upper(), priority.upper()
    if channel not in _CHANNELS or priority not in _PRIORITIES:
        raise ConfigError(f"channel {channel!r} / priority {priority!r}: choose a channel of "
                          f"{', '.join(_CHANNELS)} "
                          f"and a priority of {', '.join(_PRIORITIES)}")  # fmt: skip
    params: dict[str, str] = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: write KEY=VALUE")
        params[key] = value
    settings = get_settings()
    now = int(time.time() * 1000)
    nid = notification_id or f"manual-{now:x}"
    payload = {"event_id": stable_id(nid, "NotificationRequested"), "notification_id": nid, "user_id": user,
               "occurred_at": now, "channel": channel, "template": template, "params": params,
               "priority": priority, "correlation_id": None}  # fmt: skip
    producer = EventProducer(settings)
    producer.send_many("platform.notifications", "NotificationRequested", [payload], key_field="user_id",
                       time_field="occurred_at", source="/cli")  # fmt: skip
    producer.flush()
    console.print(f"requested {nid} for {user} ({channel}, {template})")
    if wait > 0:
        final = _wait_final(settings, nid, wait)
        console.print(final or f"no final event for {nid} within {wait:.0f} s (is the relay running?)")


def _wait_final(settings: Any, nid: str, wait_s: float) -> str | None:
    """Read ``platform.notifications`` until the final event of ``nid`` appears or ``wait_s`` passes."""
    from events.log import LogReader
    from events.offsets import high_watermarks
    from events.registry_client import registry_for

    decoder = registry_for(settings.registry_url).decoder()
    deadline = time.monotonic() + wait_s
    with LogReader(settings, "notifications-wait") as reader:
        reader.assign(
            {("platform.notifications", p): None for p in high_watermarks(settings, "platform.notifications")}
        )
        while time.monotonic() < deadline:
            for msg in reader.poll(500, 0.2):
                event = decoder.decode(msg.value() or b"")
                if event.get("notification_id") == nid and "template" not in event:
                    if "provider" in event:
                        return f"sent by {event['provider']} (attempt {event['attempt']})"
                    attempts = event["attempt"]
                    return f"failed: {event['reason']} after {attempts} attempt(s): {event.get('detail')}"
    return None


def releases(
    min_listens: Annotated[
        int, typer.Option(help="Listens of an artist that make a user a follower.", min=1)
    ] = 3,
    channel: Annotated[str, typer.Option(help="Channel of the requests.")] = "PUSH",
    from_start: Annotated[
        bool, typer.Option(help="Read catalog.albums from the start (ids are stable).")
    ] = False,
    follow: Annotated[bool, typer.Option(help="Keep reading new releases until Ctrl-C.")] = False,
) -> None:
    """Request a `new-release@1` notification for every follower of each released album's artist
    (AlbumReleased on catalog.albums; followers from the `listens` read model)."""
    from sagas.new_releases import run_requester

    if channel.upper() not in _CHANNELS:
        raise ConfigError(f"channel {channel!r}: choose one of {', '.join(_CHANNELS)}")
    stats = run_requester(
        get_settings(), min_listens=min_listens, channel=channel.upper(), from_start=from_start,
        follow=follow,
        on_album=lambda album, n: console.print(f"{album}: {n} follower(s) asked"),
    )  # fmt: skip
    console.print(f"{stats.albums} release(s), {stats.requested} request(s), {stats.undecodable} undecodable")


def status() -> None:
    """Notifications by channel and final state, from the `notifications` read model
    (`backbeat project --projection notifications` builds it)."""
    from projections.store import reader

    settings = get_settings()
    with reader(settings.duckdb_path) as con:
        rows = con.execute(
            "SELECT channel, state, count(*) AS notifications, "
            "CAST(median(latency_ms) AS BIGINT) AS median_ms "
            "FROM notifications_status GROUP BY ALL ORDER BY ALL"
        ).fetchall()
    console.print(table(["channel", "state", "notifications", "median latency (ms)"], rows))


def reset(
    yes: Annotated[
        bool, typer.Option("--yes", help="Really delete (the relay's events are its only record).")
    ] = False,
) -> None:
    """Delete the relay's event store, the provider simulator's record, the new-release positions
    and the `notifications` read model (after the embedded broker lost its log, or to start
    afresh). Stop the relay first."""
    if not yes:
        raise ConfigError("this deletes every notification record; run again with --yes")
    from sagas.notifications import reset_relay

    for line in reset_relay(get_settings()):
        console.print(f"removed {line}")
