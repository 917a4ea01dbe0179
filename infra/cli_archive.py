"""``backbeat archive`` and ``backbeat restore``: copy the log to the Parquet archive and
republish it into an empty broker (registered by :mod:`infra.cli`).

A thin shell over :mod:`projections.archive` and :mod:`projections.restore`.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Annotated

import typer

from infra.console import console, progress_bar, table
from infra.settings import get_settings

TopicOption = Annotated[
    list[str] | None,
    typer.Option("--topic", "-t", help="Only this topic (repeat for more); default: every topic."),
]


def register(app: typer.Typer) -> None:
    """Add the ``archive`` and ``restore`` commands to the ``backbeat`` app."""
    app.command("archive")(archive)
    app.command("restore")(restore)


def archive(
    once: Annotated[
        bool, typer.Option("--once", help="Archive up to the current end of every topic, then exit.")
    ] = False,
    topic: TopicOption = None,
) -> None:
    """Copy topics to the Parquet archive ($BACKBEAT_DATA_DIR/lake/archive), byte-exact plus
    decoded columns (event_type, event_id, payload_json).

    Runs in the foreground: with --once up to the topics' current ends (with a progress bar),
    else continuously until Ctrl-C. 'backbeat up' already runs an archiver in the background;
    only one archiver writes at a time. Progress is the archive's file names, so an interrupted
    archiver resumes exactly where it stopped."""
    from projections.archive import ArchiveProgress, archive_once, archive_root, run_archiver

    settings = get_settings()
    if once:
        with progress_bar() as bar:
            task = bar.add_task("archive", total=None)

            def report(p: ArchiveProgress) -> None:
                bar.update(task, completed=p.done, total=p.total, description=f"archive {p.topic}")

            stats = archive_once(settings, topic or None, progress=report)
    else:
        stop = threading.Event()

        def handler(_signum: int, _frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        console.print(f"archiving to {archive_root(settings)} continuously; Ctrl-C stops")
        stats = run_archiver(settings, stop, topics=topic or None)
    rows = [(t, n) for t, n in sorted(stats.per_topic.items()) if n]
    if rows:
        console.print(table(["topic", "records archived"], rows))
    console.print(
        f"archived {stats.records:,} records in {stats.files:,} files in {stats.seconds:.1f} s "
        f"({stats.records_per_s:,.0f} records/s); {stats.undecoded:,} values not decodable "
        f"(kept raw, payload_json NULL) -> {archive_root(settings)}"
    )


def restore(topic: TopicOption = None) -> None:
    """Republish the archive into an empty broker: same partitions, same records (key, value,
    headers, timestamp) at the same offsets, topics created first.

    Refuses a topic that holds records other than the archive's first ones (a topic holding
    exactly a prefix of the archive is continued). Afterwards checks every partition's end
    against the archive, restarts the embedded registry when it restored _schemas, and moves
    the stored offsets of the read models to the restored log, so 'backbeat project' resumes.
    'backbeat up' does this by itself when it starts an empty broker and an archive exists."""
    from projections.restore import RestoreProgress
    from projections.restore import restore as run_restore

    settings = get_settings()
    with progress_bar() as bar:
        task = bar.add_task("restore", total=None)

        def report(p: RestoreProgress) -> None:
            bar.update(task, completed=p.done, total=p.total, description=f"restore {p.topic}")

        stats = run_restore(settings, topic or None, progress=report)
    rows = [(t, n, stats.kept.get(t, 0)) for t, n in stats.per_topic.items() if n or stats.kept.get(t)]
    if rows:
        console.print(table(["topic", "records restored", "already there"], rows))
    console.print(
        f"restored {stats.records:,} records in {stats.seconds:.1f} s "
        f"({stats.records_per_s:,.0f} records/s); "
        f"{stats.rebound} read-model offset rows moved to the restored log"
        + ("; registry restarted" if stats.registry_restarted else "")
    )
