"""Blue/green replay of the saga read models (:mod:`sagas.replay`): real event stores (SQLite, and
PostgreSQL from ``conftest.py``), the gateway simulator's real SQLite record, a real DuckDB file.
Sagas are driven record by record (``saga_driver``/``feed``, no broker), projected by the live
writers (:func:`sagas.simulate.build_saga_read_models`), then replayed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.utils import get_topic

from infra.errors import ConfigError
from infra.settings import Settings
from projections.replay import ReplayProgress
from projections.sql import query
from projections.store import writer
from sagas.eventstore import eventstore_env
from sagas.gateway import GatewaySimulator, SimulatorConfig
from sagas.inventory import InventoryService
from sagas.orchestrator import Orchestrator
from sagas.readmodel import project_sagas
from sagas.replay import SAGA_READ_MODELS, SAGA_SOURCES, forget_saga_read_models, replay_saga_read_model
from sagas.saga import Saga, saga_id_for
from sagas.simulate import build_saga_read_models, gateway_path, stock_path
from tests.sagas.feed import Feeder
from tests.sagas.saga_driver import Driver, order_placed, subscription_request

STOCK = {"sku-1": 50, "sku-2": 40, "sku-3": 7}
ORCH_TABLES = SAGA_SOURCES["orchestrator"].tables
ALL_TABLES = tuple(SAGA_READ_MODELS)


class World:
    """The saga applications of one test on ``settings``' stores, driven without a broker."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        stock_path(settings).parent.mkdir(parents=True, exist_ok=True)
        stock_path(settings).write_text(json.dumps(STOCK))
        self.orch = Driver(eventstore_env(settings, Orchestrator.name))
        self.inventory = InventoryService(
            eventstore_env(settings, InventoryService.name), initial_stock=STOCK
        )
        self.feed = Feeder(self.inventory, "orders.inventory.commands", "orders")
        self.gateway = GatewaySimulator(
            gateway_path(settings),
            SimulatorConfig(seed=7, decline=0, timeout=0, duplicate=0, fail_after_effect=0),
        )
        self.started = 0

    def close(self) -> None:
        self.orch.app.close()
        self.inventory.close()
        self.gateway.close()

    def run(self, count: int) -> None:
        """Start ``count`` more sagas with varied outcomes, and their participants' work."""
        for i in range(self.started, self.started + count):
            if i % 3 == 0:  # a subscription: completed, or declined
                sub = f"sub-{i}"
                self.orch.send(
                    "billing.subscriptions", "SubscriptionRequested", subscription_request(sub, 900 + i)
                )
                sid = str(saga_id_for("subscription", sub))
                if i % 2:
                    self.orch.reply(sid, "PaymentDeclined")
                else:
                    self.orch.reply(sid, "PaymentAuthorized", provider_reference=f"gw-{i}")
                    self.orch.reply(sid, "EntitlementGranted")
                    self.orch.reply(sid, "PaymentCaptured")
            else:  # an order: confirmed and captured, or rejected out of stock
                oid = f"o-{i}"
                self.orch.send(
                    "orders.orders", "OrderPlaced", order_placed(oid, [("sku-1", 1 + i % 2, 1500)])
                )
                sid = str(saga_id_for("order", oid))
                if i % 3 == 1:
                    self.orch.reply(sid, "InventoryReserved")
                    self.orch.reply(sid, "PaymentAuthorized")
                    self.orch.reply(sid, "PaymentCaptured")
                else:
                    self.orch.reply(sid, "InventoryReservationRejected")
            self.feed.send(
                "ReserveInventory", f"r{i}:reserve", reservation_id=f"r{i}", order_id=f"o-{i}",
                lines=[{"sku": "sku-1", "quantity": 1}, {"sku": f"sku-{1 + i % 3}", "quantity": 1 + i % 2}],
                hold_until=None,
            )  # fmt: skip
            if i % 4 == 0:
                self.feed.send("ReleaseInventory", f"r{i}:release", reservation_id=f"r{i}", order_id=f"o-{i}")
            auth = self.gateway.authorize(
                idempotency_key=f"auth-{i}", saga_id=f"s-{i}", payment_id=f"p-{i}", amount_minor=100 + i,
                currency="EUR",
            )  # fmt: skip
            if i % 2 == 0:
                self.gateway.capture(
                    idempotency_key=f"cap-{i}", saga_id=f"s-{i}", payment_id=f"p-{i}", amount_minor=100 + i,
                    currency="EUR", provider_reference=str(auth.provider_reference),
                )  # fmt: skip
        self.started += count

    def sagas_in_store(self) -> int:
        # sagas only: the store also holds the subscriptions' lifecycles (issue 17, sagas.renewal)
        started = [get_topic(Saga.Started)]  # type: ignore[attr-defined]
        notes = self.orch.app.recorder.select_notifications(1, 1_000_000, topics=started)
        return len({n.originator_id for n in notes})


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings on a fresh data dir: event stores in SQLite files there, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return Settings(data_dir=tmp_path / "var")
    return Settings(data_dir=tmp_path / "var", eventstore_url=request.getfixturevalue("fresh_postgres_url"))


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "var")


@pytest.fixture
def world(settings: Settings) -> Iterator[World]:
    w = World(settings)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def sqlite_world(sqlite_settings: Settings) -> Iterator[World]:
    w = World(sqlite_settings)
    try:
        yield w
    finally:
        w.close()


def rows(settings: Settings, sql: str) -> list[tuple[Any, ...]]:
    """``sql`` as ``backbeat sql`` runs it (read-only, through the turnstile)."""
    return query(settings, sql, max_rows=None).rows


def content(settings: Settings, name: str) -> list[tuple[Any, ...]]:
    return rows(settings, f"SELECT * FROM {name} ORDER BY ALL")


def kind_of(settings: Settings, name: str) -> str:
    views = rows(settings, f"SELECT sql FROM duckdb_views() WHERE view_name = '{name}'")
    if views:
        return f"view: {views[0][0]}"
    return "table" if rows(settings, f"SELECT 1 FROM duckdb_tables() WHERE table_name = '{name}'") else "none"


def builds(settings: Settings, name: str) -> list[tuple[Any, ...]]:
    return rows(
        settings,
        f"SELECT build, table_name, state FROM projection_builds WHERE projection = '{name}' ORDER BY build",
    )


def test_replay_rebuilds_equal_tables_switches_and_the_live_projection_continues(
    settings: Settings, world: World
) -> None:
    world.run(12)
    build_saga_read_models(settings)
    before = {t: content(settings, t) for t in ALL_TABLES}
    assert len(before["sagas"]) == 12 and before["saga_events"] and before["saga_order_lines"]
    assert before["inventory_reservations"] and before["gateway_operations"]
    during: list[int] = []
    phases: list[ReplayProgress] = []

    def progress(p: ReplayProgress) -> None:
        phases.append(p)
        if p.phase == "build":  # a `backbeat sql` read while the build runs: the live table answers
            during.append(rows(settings, "SELECT count(*) FROM sagas")[0][0])

    notifications = len(world.orch.app.recorder.select_notifications(1, 1_000_000))
    result = replay_saga_read_model(settings, "saga_events", progress=progress)
    assert (result.verified, result.switched, result.verification.mode) == (True, True, "live")
    assert result.table == "saga_events__v1_b1" and result.build == 1
    assert result.stop == {0: notifications} and result.events == notifications
    assert during and set(during) == {12}
    assert phases[-1].phase == "verify" and any(
        p.phase == "build" and p.events == notifications for p in phases
    )
    for t in ORCH_TABLES:  # the group was rebuilt and switched together
        assert kind_of(settings, t).endswith(f"FROM {t}__v1_b1;"), kind_of(settings, t)
        assert builds(settings, t) == [(0, f"{t}__v1_b0", "old"), (1, f"{t}__v1_b1", "current")]
        assert content(settings, t) == before[t]
        assert content(settings, f"{t}__v1_b0") == before[t]

    for name in ("inventory_stock", "gateway_operations"):
        r = replay_saga_read_model(settings, name)
        assert (r.verified, r.verification.mode) == (True, "live"), r.verification.detail
    for t in ALL_TABLES:
        assert content(settings, t) == before[t]
        assert kind_of(settings, t).startswith("view")

    # the live writers keep going after the switch: into the current build tables, not the views
    world.run(6)
    build_saga_read_models(settings)
    assert rows(settings, "SELECT count(*) FROM sagas")[0][0] == 18
    assert rows(settings, "SELECT count(*) FROM sagas__v1_b1")[0][0] == 18
    assert rows(settings, "SELECT count(*) FROM sagas__v1_b0")[0][0] == 12  # the retired table stays
    assert len(content(settings, "gateway_operations")) > len(before["gateway_operations"])
    assert len(content(settings, "inventory_reservations__v1_b1")) > len(before["inventory_reservations"])
    # and a second replay gives what they wrote
    after = {t: content(settings, t) for t in ALL_TABLES}
    for name in ("sagas", "inventory_reservations", "gateway_operations"):
        r = replay_saga_read_model(settings, name)
        assert (r.verified, r.build, r.verification.mode) == (True, 2, "live"), r.verification.detail
    for t in ALL_TABLES:
        assert content(settings, t) == after[t]
        assert kind_of(settings, t).endswith(f"FROM {t}__v1_b2;")
        assert [b[2] for b in builds(settings, t)] == ["old", "old", "current"]


def test_a_tampered_build_fails_verification_and_is_not_switched(
    sqlite_settings: Settings, sqlite_world: World
) -> None:
    settings = sqlite_settings
    sqlite_world.run(9)
    build_saga_read_models(settings)
    before = content(settings, "sagas")

    def tamper(p: ReplayProgress) -> None:
        if p.phase == "verify":
            with writer(settings.duckdb_path) as conn:
                conn.execute("UPDATE sagas__v1_b1 SET state = 'COMPLETED' WHERE state <> 'COMPLETED'")

    result = replay_saga_read_model(settings, "sagas", progress=tamper)
    assert (result.verified, result.switched, result.verification.mode) == (False, False, "recount")
    # the group's totals: as many rows, other content
    assert result.verification.expected[0] == result.verification.got[0] > 9
    assert result.verification.expected[1] != result.verification.got[1]
    assert "sagas: build has 9 rows" in result.verification.detail
    assert kind_of(settings, "sagas") == "table" and content(settings, "sagas") == before
    assert [b[2] for b in builds(settings, "sagas")] == ["failed"]
    assert [b[2] for b in builds(settings, "saga_order_lines")] == ["failed"]

    def drop_a_row(p: ReplayProgress) -> None:
        if p.phase == "verify":
            with writer(settings.duckdb_path) as conn:
                conn.execute(
                    "DELETE FROM gateway_operations__v1_b1 WHERE rowid = (SELECT min(rowid) FROM gateway_operations__v1_b1)"
                )

    bad = replay_saga_read_model(settings, "gateway_operations", progress=drop_a_row)
    assert not bad.verified and bad.verification.got[0] == bad.verification.expected[0] - 1
    assert kind_of(settings, "gateway_operations") == "table"

    # an untampered replay then switches, and drop_old drops the failed builds and the retired tables
    good = replay_saga_read_model(settings, "sagas", drop_old=True)
    assert good.verified and good.build == 2
    assert sorted(good.dropped) == sorted([f"{t}__v1_b{b}" for t in ORCH_TABLES for b in (0, 1)])
    tables = {r[0] for r in rows(settings, "SELECT table_name FROM duckdb_tables()")}
    assert not any(f"{t}__v1_b{b}" in tables for t in ORCH_TABLES for b in (0, 1))
    assert all(f"{t}__v1_b2" in tables for t in ORCH_TABLES)
    assert [b[1:] for b in builds(settings, "sagas")] == [("sagas__v1_b2", "current")]
    assert content(settings, "sagas") == before


def test_drop_old_keeps_only_the_current_version(sqlite_settings: Settings, sqlite_world: World) -> None:
    settings = sqlite_settings
    sqlite_world.run(5)
    build_saga_read_models(settings)
    before = content(settings, "inventory_stock")
    first = replay_saga_read_model(settings, "inventory_stock")
    assert first.verified and first.dropped == []
    second = replay_saga_read_model(settings, "inventory_reservations", drop_old=True)
    assert second.verified and second.build == 2
    assert sorted(second.dropped) == sorted(
        f"{t}__v1_b{b}" for t in ("inventory_reservations", "inventory_stock") for b in (0, 1)
    )
    tables = {r[0] for r in rows(settings, "SELECT table_name FROM duckdb_tables()")}
    assert {t for t in tables if t.startswith("inventory_")} == {
        "inventory_reservations__v1_b2",
        "inventory_stock__v1_b2",
    }
    assert content(settings, "inventory_stock") == before
    assert sorted(r[0] for r in before) == sorted(STOCK)  # untouched SKUs too, at their initial units


def test_an_unprojected_store_is_verified_by_a_fresh_recount(
    sqlite_settings: Settings, sqlite_world: World
) -> None:
    settings = sqlite_settings
    sqlite_world.run(4)
    build_saga_read_models(settings)
    sqlite_world.run(5)  # recorded in the store, not projected: the live tables stand behind
    result = replay_saga_read_model(settings, "sagas")
    assert (result.verified, result.verification.mode) == (True, "recount"), result.verification.detail
    assert "fresh projection" in result.verification.detail
    assert rows(settings, "SELECT count(*) FROM sagas")[0][0] == 9 == sqlite_world.sagas_in_store()
    # the recorded position is the build's: the live projection resumes after it, nothing doubled
    with writer(settings.duckdb_path) as conn:
        app = sqlite_world.orch.app
        assert project_sagas(app, conn) == 0
        sqlite_world.run(1)
        assert project_sagas(app, conn) == 1
    assert rows(settings, "SELECT count(*), count(DISTINCT saga_id) FROM sagas")[0] == (10, 10)
    assert rows(settings, "SELECT count(*) FROM sagas__v1_b1")[0][0] == 10


def test_the_build_catches_up_with_a_live_projection_that_kept_going(
    sqlite_settings: Settings, sqlite_world: World
) -> None:
    settings = sqlite_settings
    sqlite_world.run(6)
    build_saga_read_models(settings)
    seen: list[str] = []

    def keep_projecting(p: ReplayProgress) -> None:
        seen.append(p.phase)
        if p.phase == "build" and seen.count("build") == 1:  # while the build starts, sagas go on
            sqlite_world.run(3)
            with writer(settings.duckdb_path) as conn:
                project_sagas(sqlite_world.orch.app, conn)

    result = replay_saga_read_model(settings, "sagas", progress=keep_projecting)
    assert "catch-up" in seen
    assert result.verified and result.verification.mode == "live", result.verification.detail
    end = int(sqlite_world.orch.app.recorder.max_notification_id())
    assert result.stop == {0: end}
    assert rows(settings, "SELECT count(*) FROM sagas")[0][0] == 9
    assert rows(settings, "SELECT notification_id FROM saga_projection WHERE store = 'orchestrator'") == [
        (end,)
    ]


def test_unknown_names_and_a_missing_gateway_record_are_refused(sqlite_settings: Settings) -> None:
    with pytest.raises(ConfigError, match="not a saga read model"):
        replay_saga_read_model(sqlite_settings, "listens")
    with pytest.raises(ConfigError, match="no gateway record"):
        replay_saga_read_model(sqlite_settings, "gateway_operations")


def test_forget_drops_views_and_versions(sqlite_settings: Settings, sqlite_world: World) -> None:
    settings = sqlite_settings
    sqlite_world.run(3)
    build_saga_read_models(settings)
    assert replay_saga_read_model(settings, "sagas").switched
    with writer(settings.duckdb_path) as conn:
        conn.begin()
        dropped = forget_saga_read_models(conn)
        conn.commit()
    assert {"sagas", "sagas__v1_b0", "sagas__v1_b1", "gateway_operations", "saga_projection"} <= set(dropped)
    left = rows(
        settings,
        "SELECT table_name FROM duckdb_tables() UNION ALL SELECT view_name FROM duckdb_views() WHERE NOT internal",
    )
    assert not [n for (n,) in left if n.split("__")[0] in SAGA_READ_MODELS or n == "saga_projection"]
    build_saga_read_models(settings)  # and the live writers start afresh
    assert rows(settings, "SELECT count(*) FROM sagas")[0][0] == 3 and kind_of(settings, "sagas") == "table"


def test_backbeat_replay_rebuilds_a_saga_read_model(sqlite_settings: Settings, sqlite_world: World) -> None:
    """The command users run: ``backbeat replay sagas`` dispatches to the saga replay, and refuses
    the options of a Kafka replay with the reason."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from tests.conftest import env_for  # noqa: PLC0415

    settings = sqlite_settings
    sqlite_world.run(4)
    build_saga_read_models(settings)
    before = content(settings, "sagas")
    env = env_for(settings)
    cli = [sys.executable, "-m", "infra.cli", "replay"]
    done = subprocess.run([*cli, "sagas", "--yes"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "sagas is now version 1" in done.stdout and kind_of(settings, "sagas").startswith("view: ")
    assert content(settings, "sagas") == before
    refused = subprocess.run(
        [*cli, "sagas", "--from", "2026-01-01", "--yes"], env=env, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 1 and "notification log" in refused.stderr + refused.stdout
