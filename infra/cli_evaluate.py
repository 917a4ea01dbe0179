"""``backbeat evaluate``: offline evaluation of the session-based recommenders
(:mod:`personalisation.evaluation`) on listening files in the 30Music layout, the train/test
split that makes its numbers reproducible with other tools, and the A/B readout of the running
experiment from the read models (:mod:`projections.experiment_readout`); registered by
:mod:`infra.cli`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from infra.console import console, err_console, run_with_bar
from infra.errors import BackbeatError
from infra.resources import LISTENS_30MUSIC

if TYPE_CHECKING:
    from infra.settings import Settings
    from personalisation.evaluation import Result
    from projections.experiment_readout import VariantReadout

#: The data set evaluated when neither --train nor --test is given (split by its split column):
#: the 30Music listens shipped with backbeat (``data/listens_30music_2014.tsv.gz``).
DEFAULT_DATA = LISTENS_30MUSIC


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` command group to the ``backbeat`` app."""
    group = typer.Typer(
        help="Offline evaluation of the recommenders on real listening sessions, and the A/B readout.",
        no_args_is_help=True,
        rich_markup_mode="markdown",
    )
    app.add_typer(group, name="evaluate")
    group.command("recommendations")(recommendations)
    group.command("split")(split)
    group.command("experiment")(experiment)


def recommendations(
    train: Annotated[
        Path | None,
        typer.Option(
            help="Training sessions (30Music-layout TSV). With --test; default: see --data.", dir_okay=False
        ),
    ] = None,
    test: Annotated[
        Path | None,
        typer.Option(help="Test sessions (30Music-layout TSV), later than --train.", dir_okay=False),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Used when --train/--test are omitted: one file with a split column; its last "
            "time window is the test set, the earlier windows the training set. "
            "Default: the 30Music listens shipped with backbeat (data/listens_30music_2014.tsv.gz).",
            dir_okay=False,
        ),
    ] = None,
    cutoff: Annotated[int, typer.Option(help="List length k of HR@k and MRR@k.", min=1)] = 20,
    exclude_context: Annotated[
        bool,
        typer.Option(
            "--exclude-context",
            help="Variant: drop the tracks already in the context from every list (default: keep "
            "them, a track heard earlier in the session can be the next one).",
        ),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help='One JSON line per method: {"method", "hr_at_20", "mrr_at_20", "sessions", '
            '"targets", "unseen_targets", "cutoff", "seconds", "hr_at_20_ci", "mrr_at_20_ci"} '
            "(20 = --cutoff; the _ci keys are [low, high] 95% bootstrap intervals).",
        ),
    ] = False,
) -> None:
    """Next-item evaluation of the streaming model against item-to-item co-occurrence,
    most-popular, session-kNN, sequential rules (sr), V-SkNN, STAN and V-STAN.

    Trains each method on the training sessions and predicts the next track at every position of
    the test sessions; reports HR@k and MRR@k (k = --cutoff, 20 by default). Without --train and
    --test, the 30Music file (--data) is split by its split column: last window = test, earlier
    windows = train (`backbeat evaluate split` writes those two files).

    Protocol (after Ludewig & Jannach 2018): consecutive repeats of a track are collapsed to one
    play; for every test session with 2+ plays and every position i >= 1, the plays before i are
    the context and play i the target. Targets never seen in training count as misses; tracks of
    the context are not excluded (see --exclude-context). HR@k: share of targets in the top k;
    MRR@k: mean of 1/rank, 0 outside the top k. Intervals: 95% percentile bootstrap over test
    sessions (1000 resamples, seeded).

    The streaming methods (streaming, and its ablations streaming-frozen, streaming-sr,
    streaming-item-to-item) are evaluated test-then-train: the model reads the training listens,
    then the test listens in event-time order, ranking each target from the model as it stands
    just before that listen (streaming-frozen stops learning at the end of training)."""
    from personalisation.evaluation import run_evaluation
    from personalisation.sessions_data import read_sessions, split_last_window

    if (train is None) != (test is None):
        raise BackbeatError("pass both --train and --test, or neither (to split --data by its split column)")
    if train is not None and test is not None:
        train_sessions, test_sessions = read_sessions(train), read_sessions(test)
        used = (
            f"train: {train} ({len(train_sessions):,} sessions); "
            f"test: {test} ({len(test_sessions):,} sessions)"
        )
    else:
        data = data or DEFAULT_DATA
        window = split_last_window(read_sessions(data), str(data))
        train_sessions, test_sessions = window.train, window.test
        used = (
            f"data: {data}; train: windows {', '.join(window.train_windows)} ({len(train_sessions):,} "
            f"sessions); test: window {window.test_window} ({len(test_sessions):,} sessions)"
        )
    err_console.print(used, markup=False, highlight=False)

    def work(set_total: Callable[[int], None], advance: Callable[[int], None]) -> list[Result]:
        return run_evaluation(
            train_sessions,
            test_sessions,
            cutoff,
            set_total=set_total,
            advance=advance,
            clock=time.perf_counter,
            exclude_context=exclude_context,
        )

    results = run_with_bar("evaluating", work)
    if as_json:
        for r in results:
            print(json.dumps(r.as_json()), flush=True)
        return
    console.print(results_table(results))
    unseen, targets = results[0].unseen_targets, results[0].targets
    console.print(
        f"{unseen:,} of {targets:,} targets ({unseen / targets:.1%}) never occur in training: "
        "a miss for every method, counted in the rates above.",
        style="dim",
    )
    console.print("protocol: backbeat evaluate recommendations --help", style="dim")


def results_table(results: list[Result]) -> Table:
    """The results as a rich table: method, HR@k and MRR@k to 4 decimals with their 95 %
    bootstrap intervals, sessions, targets, seconds of prediction."""
    k = results[0].cutoff if results else 20
    tbl = Table(title=f"Next-item prediction, top {k}", title_justify="left", header_style="bold")
    tbl.add_column("method")
    for name in (f"HR@{k}", "95% CI", f"MRR@{k}", "95% CI", "sessions", "targets", "seconds"):
        tbl.add_column(name, justify="right")
    for r in results:
        tbl.add_row(
            r.method,
            f"{r.hr:.4f}",
            f"{r.hr_ci[0]:.4f}–{r.hr_ci[1]:.4f}",
            f"{r.mrr:.4f}",
            f"{r.mrr_ci[0]:.4f}–{r.mrr_ci[1]:.4f}",
            f"{r.sessions:,}",
            f"{r.targets:,}",
            f"{r.seconds:.1f}",
        )
    return tbl


def split(
    file: Annotated[
        Path | None,
        typer.Argument(
            help="A 30Music-layout TSV (plain or gzip) with a split column. Default: the 30Music "
            "listens shipped with backbeat (data/listens_30music_2014.tsv.gz).",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Directory for train.tsv and test.tsv.", file_okay=False)] = Path(
        "var/evaluation"
    ),
) -> None:
    """Write the train/test files `evaluate recommendations` uses by default.

    FILE is split by its split column: the last time window (by its first play) goes to
    OUT/test.tsv, all earlier windows to OUT/train.tsv, in the same 30Music layout, sessions in
    start-time order. Then `backbeat evaluate recommendations --train OUT/train.tsv --test
    OUT/test.tsv` gives the same numbers as the default run."""
    from personalisation.sessions_data import read_sessions, split_last_window, write_sessions

    file = file or DEFAULT_DATA
    window = split_last_window(read_sessions(file), str(file))
    train_rows = write_sessions(out / "train.tsv", window.train)
    test_rows = write_sessions(out / "test.tsv", window.test)
    console.print(
        f"{out / 'train.tsv'}: windows {', '.join(window.train_windows)}, {len(window.train):,} sessions, "
        f"{train_rows:,} plays"
    )
    console.print(
        f"{out / 'test.tsv'}: window {window.test_window}, {len(window.test):,} sessions, {test_rows:,} plays"
    )


def experiment(
    experiment_id: Annotated[
        str, typer.Option("--experiment", help="Experiment id (as in recommendation_history).")
    ] = "made-for-you-v1",
    days: Annotated[
        int,
        typer.Option(help="Play-through window in days after the list was generated (event time).", min=1),
    ] = 7,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help='One JSON line per variant: {"experiment_id", "experiment_version", "variant", '
            '"control", "users", "lists", "recommended", "played", "play_through", "play_through_ci", '
            '"mean_user_play_through", "mean_ci", "diff_vs_control", "diff_ci", "immature_lists", '
            '"immature_recommended", "window_days", "watermark"} (rates are fractions 0..1, the _ci '
            "keys [low, high] 95% bootstrap intervals over users, null without users).",
        ),
    ] = False,
) -> None:
    """A/B readout of an experiment from the read models: play-through of recommended tracks within
    --days days, per variant, with 95% intervals.

    Every track of every list served (recommendation_history) counts as recommended to its user
    at the list's generated_at (event time); it is played when the listens read model has a
    listen of that user and track after generated_at and at most --days days later (exactly
    --days days later counts, a millisecond more does not; a listen at generated_at does not).
    A user's play-through is played / recommended; the metric is the mean over the variant's users
    of their play-through, because the user is the unit of randomisation (Kohavi, Tang & Xu 2020,
    ch. 18). Also shown: the pooled played / recommended.

    Lists whose window has not closed yet (generated_at + --days later than the latest listen
    event time in listens) are left out, not counted as unplayed; the table says how many.
    Intervals: 95% percentile bootstrap over users (1000 resamples, seeded); the difference against
    the control (the experiment's first variant) resamples both variants' users independently.

    Reads the DuckDB read models read-only; `backbeat project` must have run `listens` and
    `recommendations` (it creates the views experiment_exposures, experiment_users and
    experiment_readout, also queryable with `backbeat sql`)."""
    from projections.experiment_readout import readout

    results = readout(_settings(), experiment_id, days)
    if as_json:
        for r in results:
            print(json.dumps(r.as_json()), flush=True)
        return
    console.print(readout_table(results))
    watermark = results[0].watermark
    immature = sum(r.immature_lists for r in results)
    console.print(
        f"watermark (latest listen event time): {watermark.isoformat(sep=' ') if watermark else 'none'}; "
        f"{immature:,} list(s) whose {days}-day window is still open are left out.",
        style="dim",
    )
    console.print("metric and intervals: backbeat evaluate experiment --help", style="dim")


def _settings() -> Settings:
    from infra.settings import get_settings

    return get_settings()


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _ci(ci: tuple[float, float] | None) -> str:
    return "–" if ci is None else f"{ci[0]:.4f} – {ci[1]:.4f}"


def readout_table(results: list[VariantReadout]) -> Table:
    """The readout as a rich table, one row per (version, variant): users, lists, recommended,
    played within the window, pooled play-through, per-user mean play-through with its 95 %
    interval, difference against the control with its interval, lists left out as immature."""
    first = results[0]
    tbl = Table(
        title=f"{first.experiment_id}: play-through within {first.window_days} days, per variant",
        title_justify="left",
        header_style="bold",
    )
    tbl.add_column("version", justify="right")
    tbl.add_column("variant")
    for name in (
        "users", "lists", "recommended", f"played ≤ {first.window_days} d", "pooled",
        "per-user mean", "95% CI", "diff vs control", "95% CI", "immature lists",
    ):  # fmt: skip
        tbl.add_column(name, justify="right")
    for r in results:
        is_control = r.variant == r.control
        tbl.add_row(
            str(r.experiment_version),
            f"{r.variant} (control)" if is_control and r.variant != "control" else r.variant,
            f"{r.users:,}",
            f"{r.lists:,}",
            f"{r.recommended:,}",
            f"{r.played:,}",
            _rate(r.play_through),
            _rate(r.mean_user_play_through),
            _ci(r.mean_ci),
            "–" if is_control or r.diff_vs_control is None else f"{r.diff_vs_control:+.4f}",
            "–" if is_control else _ci(r.diff_ci),
            f"{r.immature_lists:,}",
        )
    return tbl
