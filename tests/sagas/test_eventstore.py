"""Event-store backends of the saga applications: one contract, run against SQLite and PostgreSQL.

The contract is what the sagas rely on: aggregates survive a restart of their application; a
projection records its new events atomically with a Tracking position, so processing the same
Kafka record twice (tracking name ``topic:partition``, notification id ``offset + 1``) fails with
IntegrityError and records nothing; applications sharing one database stay apart; the
notification log is ordered. The PostgreSQL server is real (``postgres_url`` in conftest.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import IntegrityError, Tracking
from eventsourcing.postgres import PostgresFactory
from eventsourcing.projection import EventSourcedProjection
from eventsourcing.sqlite import SQLiteFactory

from infra.errors import ConfigError
from infra.settings import Settings
from sagas.eventstore import describe_eventstore, eventstore_env
from tests.sagas.pg import PostgresUnavailable, find_postgres_bindir, postgres_for_tests, start_postgres

# -- a tiny domain ----------------------------------------------------------------------------


class Account(Aggregate):
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.credits: list[int] = []

    @event("Credited")
    def credit(self, amount: int) -> None:
        self.credits.append(amount)


class Orders(Application[Any]):
    pass


class Payments(Application[Any]):
    pass


@dataclass(frozen=True)
class KafkaRecord:
    """What a saga consumer hands its projection: a decoded record and where it came from."""

    topic: str
    partition: int
    offset: int
    user: str
    amount: int

    def tracking(self) -> Tracking:
        return Tracking(f"{self.topic}:{self.partition}", self.offset + 1)


class Ledger(EventSourcedProjection[Any]):
    """Opens a new account per record: new aggregate ids each time, so only tracking can reject a
    duplicate."""

    def policy(self, domain_event: Any, processing_event: ProcessingEvent[Any]) -> None:
        account = Account(owner=domain_event.user)
        account.credit(domain_event.amount)
        processing_event.collect_events(account)


# -- backends -----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings for a fresh, empty store: a new data dir (SQLite) or a new database (PostgreSQL)."""
    if request.param == "sqlite":
        return Settings(data_dir=tmp_path / "var")
    return Settings(data_dir=tmp_path / "var", eventstore_url=request.getfixturevalue("fresh_postgres_url"))


@pytest.fixture
def open_app(settings: Settings) -> Iterator[Callable[..., Any]]:
    """open_app(cls) -> cls(env=eventstore_env(settings, cls.name)); all closed after the test."""
    opened: list[Application[Any]] = []

    def open_(cls: type[Application[Any]]) -> Any:
        app = cls(env=eventstore_env(settings, cls.name))
        opened.append(app)
        return app

    yield open_
    for app in opened:
        app.close()


class TestEventStoreContract:
    def test_factory_matches_the_backend(self, settings, open_app):
        app = open_app(Orders)
        expected = PostgresFactory if settings.eventstore_url else SQLiteFactory
        assert type(app.factory) is expected

    def test_aggregate_survives_a_restart_of_its_application(self, open_app):
        app = open_app(Orders)
        account = Account(owner="u1")
        account.credit(5)
        account.credit(7)
        app.save(account)
        app.close()

        again = open_app(Orders)
        copy = again.repository.get(account.id)
        assert (copy.owner, copy.credits, copy.version) == ("u1", [5, 7], 3)

    def test_projection_records_each_kafka_record_exactly_once(self, open_app):
        ledger = open_app(Ledger)
        first = KafkaRecord("payments.requests", 0, offset=0, user="u1", amount=10)
        ledger.process_event(first, first.tracking())
        assert ledger.recorder.max_tracking_id("payments.requests:0") == 1
        assert len(ledger.recorder.select_notifications(start=1, limit=100)) == 2

        # Redelivered after a crash: same topic/partition/offset -> rejected, nothing recorded.
        with pytest.raises(IntegrityError):
            ledger.process_event(first, first.tracking())
        assert len(ledger.recorder.select_notifications(start=1, limit=100)) == 2
        assert ledger.recorder.max_tracking_id("payments.requests:0") == 1

        second = KafkaRecord("payments.requests", 0, offset=1, user="u2", amount=20)
        ledger.process_event(second, second.tracking())
        assert ledger.recorder.max_tracking_id("payments.requests:0") == 2
        # Single-row tracking: an older position than the last one is rejected too.
        with pytest.raises(IntegrityError):
            ledger.process_event(first, first.tracking())
        notifications = ledger.recorder.select_notifications(start=1, limit=100)
        owners = [
            ledger.repository.get(n.originator_id).owner for n in notifications if n.originator_version == 1
        ]
        assert owners == ["u1", "u2"]

        # Partitions are tracked apart; unknown names have no position.
        other = KafkaRecord("payments.requests", 1, offset=41, user="u3", amount=1)
        ledger.process_event(other, other.tracking())
        assert ledger.recorder.max_tracking_id("payments.requests:1") == 42
        assert ledger.recorder.max_tracking_id("payments.requests:0") == 2
        assert ledger.recorder.max_tracking_id("never.seen:0") is None

    def test_tracking_without_events_for_an_outbox_position(self, open_app):
        ledger = open_app(Ledger)
        ledger.recorder.insert_tracking(Tracking("outbox", 5))
        assert ledger.recorder.max_tracking_id("outbox") == 5
        with pytest.raises(IntegrityError):
            ledger.recorder.insert_tracking(Tracking("outbox", 5))
        ledger.recorder.insert_tracking(Tracking("outbox", 9))
        assert ledger.recorder.max_tracking_id("outbox") == 9

    def test_two_applications_in_one_store_do_not_see_each_other(self, settings, open_app):
        orders, payments = open_app(Orders), open_app(Payments)
        account = Account(owner="u1")
        orders.save(account)

        assert [n.originator_id for n in orders.recorder.select_notifications(start=1, limit=10)] == [
            account.id
        ]
        assert payments.recorder.select_notifications(start=1, limit=10) == []
        with pytest.raises(AggregateNotFoundError):
            payments.repository.get(account.id)
        if settings.eventstore_url:
            with psycopg.connect(settings.eventstore_url) as conn:
                tables = {row[0] for row in conn.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
                )}  # fmt: skip
            assert {"orders_events", "payments_events"} <= tables
        else:
            assert (settings.data_dir / "eventstore" / "Orders.sqlite").is_file()
            assert (settings.data_dir / "eventstore" / "Payments.sqlite").is_file()

    def test_notification_log_lists_events_in_order(self, open_app):
        app = open_app(Orders)
        first, second = Account(owner="a"), Account(owner="b")
        first.credit(1)
        app.save(first)
        second.credit(2)
        first.credit(3)
        app.save(second, first)

        notifications = app.recorder.select_notifications(start=1, limit=10)
        ids = [n.id for n in notifications]
        assert ids == sorted(ids) and len(ids) == 5
        assert [(n.originator_id, n.originator_version) for n in notifications] == [
            (first.id, 1), (first.id, 2), (second.id, 1), (second.id, 2), (first.id, 3),
        ]  # fmt: skip
        assert notifications[1].topic.endswith("Account.Credited")
        # Paging: start is inclusive, limit caps the page.
        page = app.recorder.select_notifications(start=ids[2], limit=2)
        assert [n.id for n in page] == ids[2:4]


# -- configuration (no database) ----------------------------------------------------------------


def test_default_is_one_sqlite_file_per_application_under_the_data_dir(tmp_path):
    settings = Settings.from_env({"BACKBEAT_DATA_DIR": str(tmp_path / "var")})
    env = eventstore_env(settings, "Orchestrator")
    assert env["PERSISTENCE_MODULE"] == "eventsourcing.sqlite"
    assert env["SQLITE_DBNAME"] == str(tmp_path / "var" / "eventstore" / "Orchestrator.sqlite")
    assert (tmp_path / "var" / "eventstore").is_dir()
    assert int(env["SQLITE_LOCK_TIMEOUT"]) > 0
    assert describe_eventstore(settings) == f"sqlite: {tmp_path / 'var' / 'eventstore'}"


def test_sqlite_url_moves_the_files(tmp_path):
    settings = Settings(data_dir=tmp_path / "var", eventstore_url=f"sqlite://{tmp_path}/my%20store")
    env = eventstore_env(settings, "PaymentService")
    assert env["SQLITE_DBNAME"] == str(tmp_path / "my store" / "PaymentService.sqlite")
    assert describe_eventstore(settings) == f"sqlite: {tmp_path / 'my store'}"


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "PostgreSQL"])
def test_postgres_url_becomes_eventsourcing_keys(scheme):
    settings = Settings.from_env(
        {"BACKBEAT_EVENTSTORE_URL": f"{scheme}://bb:p%40ss%3Aword@db.internal:6543/sagas"}
    )
    env = eventstore_env(settings, "Orchestrator")
    assert {k: env[k] for k in env if k.startswith(("PERSISTENCE", "POSTGRES_DBNAME", "POSTGRES_HOST", "POSTGRES_PORT",
                                                      "POSTGRES_USER", "POSTGRES_PASSWORD"))} == {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": "sagas",
        "POSTGRES_HOST": "db.internal",
        "POSTGRES_PORT": "6543",
        "POSTGRES_USER": "bb",
        "POSTGRES_PASSWORD": "p@ss:word",
    }  # fmt: skip
    for key in (
        "POSTGRES_CONNECT_TIMEOUT",
        "POSTGRES_POOL_SIZE",
        "POSTGRES_MAX_OVERFLOW",
        "POSTGRES_LOCK_TIMEOUT",
    ):
        assert int(env[key]) > 0
    described = describe_eventstore(settings)
    assert described == "postgresql://bb@db.internal:6543/sagas"
    assert "p@ss" not in described


def test_postgres_defaults_port_and_empty_password():
    env = eventstore_env(Settings(eventstore_url="postgresql://bb@[::1]/sagas"), "Inventory")
    assert (env["POSTGRES_HOST"], env["POSTGRES_PORT"], env["POSTGRES_PASSWORD"]) == ("::1", "5432", "")
    assert (
        describe_eventstore(Settings(eventstore_url="postgresql://bb@[::1]/sagas"))
        == "postgresql://bb@[::1]:5432/sagas"
    )


def test_settings_carry_the_url_to_child_processes():
    settings = Settings.from_env({"BACKBEAT_EVENTSTORE_URL": " postgresql://bb@h/db "})
    assert settings.eventstore_url == "postgresql://bb@h/db"
    assert Settings.from_env(settings.to_env()).eventstore_url == "postgresql://bb@h/db"
    assert Settings.from_env({}).to_env()["BACKBEAT_EVENTSTORE_URL"] == ""


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://bb:secret@h/db", "unsupported scheme 'mysql'"),
        ("/var/lib/eventstore", "unsupported scheme ''"),
        ("postgresql://bb@h:notaport/db", "port"),
        ("postgresql://bb@h:99999/db", "port"),
        ("postgresql://bb@/db", "no host"),
        ("postgresql://h:5432/db", "no user"),
        ("postgresql://bb@h:5432", "database name"),
        ("postgresql://bb@h:5432/db/extra", "database name"),
        ("postgresql://bb@h/db?sslmode=require", "query"),
        ("postgresql://bb@[::1/db", "not a URL"),
        ("sqlite://relative/dir", "three slashes"),
    ],
)
def test_bad_urls_raise_config_error_naming_the_variable(tmp_path, url, message):
    settings = Settings(data_dir=tmp_path, eventstore_url=url)
    with pytest.raises(ConfigError, match=message) as info:
        eventstore_env(settings, "Orders")
    assert "BACKBEAT_EVENTSTORE_URL" in str(info.value)
    with pytest.raises(ConfigError):
        describe_eventstore(settings)


def test_password_never_appears_in_errors():
    with pytest.raises(ConfigError) as info:
        eventstore_env(Settings(eventstore_url="postgresql://bb:hunter2@h:x/db"), "Orders")
    assert "hunter2" not in str(info.value) and "bb:***@h:x" in str(info.value)


@pytest.mark.parametrize("name", ["", "1st", "orders-app", "a/b", "x" * 55])
def test_application_names_must_be_identifiers(tmp_path, name):
    with pytest.raises(ValueError, match="application name"):
        eventstore_env(Settings(data_dir=tmp_path), name)


def test_explicit_env_beats_plain_process_variables(tmp_path, monkeypatch):
    """Application.construct_env: class env < os.environ < env=...; ours wins over plain keys."""
    monkeypatch.setenv("PERSISTENCE_MODULE", "eventsourcing.popo")
    monkeypatch.setenv("SQLITE_DBNAME", str(tmp_path / "elsewhere.sqlite"))
    app = Orders(env=eventstore_env(Settings(data_dir=tmp_path), "Orders"))
    try:
        assert type(app.factory) is SQLiteFactory
        assert app.factory.env.get("SQLITE_DBNAME") == str(tmp_path / "eventstore" / "Orders.sqlite")
    finally:
        app.close()


def test_highest_postgres_version_is_chosen(tmp_path):
    for version in ("9.6", "15", "16", "17"):
        bindir = tmp_path / version / "bin"
        bindir.mkdir(parents=True)
        for tool in ("initdb", "pg_ctl", "postgres") if version != "17" else ("initdb",):  # 17: incomplete
            (bindir / tool).write_text("")
    assert find_postgres_bindir(tmp_path, search_path="") == tmp_path / "16" / "bin"
    assert find_postgres_bindir(tmp_path / "missing", search_path="") is None


def test_postgres_binaries_on_path_are_found_when_the_debian_folder_has_none(tmp_path):
    """Fedora and Homebrew put initdb, pg_ctl and postgres on PATH, not under /usr/lib/postgresql."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("initdb", "pg_ctl"):
        (bindir / tool).write_text("")
        (bindir / tool).chmod(0o755)
    assert find_postgres_bindir(tmp_path / "missing", search_path=str(bindir)) is None  # no postgres
    (bindir / "postgres").write_text("")
    assert find_postgres_bindir(tmp_path / "missing", search_path=str(bindir)) == bindir


def test_missing_postgres_names_the_install_command(tmp_path):
    with pytest.raises(PostgresUnavailable, match=re.escape("apt-get install -y postgresql")) as raised:
        start_postgres(tmp_path / "pg", lib_dir=tmp_path / "no-postgresql-here", search_path="")
    assert "saga tests" in str(raised.value) and "BACKBEAT_TEST_POSTGRES_URL" in str(raised.value)


def test_configured_test_server_is_used_as_is(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKBEAT_TEST_POSTGRES_URL", "postgresql://bb@db.test:5433/ci")
    url, stop = postgres_for_tests(tmp_path)
    stop()
    assert url == "postgresql://bb@db.test:5433/ci" and list(tmp_path.iterdir()) == []
