"""Ground truth for the feature agents: DuckDB GROUP BY queries over the raw input, with the
lateness rule of :mod:`streams.windows` written in SQL (a window function gives the watermark
before each record), shared by the pure and the broker tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from streams.windows import HoppingWindows


@dataclass(frozen=True)
class Row:
    """One record of a source partition: a listen, or a watermark (``control=True``, ``t`` =
    the mark)."""

    partition: int
    offset: int
    t: int
    user_id: str = ""
    track_id: str = ""
    artist_id: str = ""
    event_id: str = ""
    control: bool = False


def connect(rows: Sequence[Row]) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the rows as table ``src``."""
    con = duckdb.connect()
    table = pa.Table.from_pylist([vars(r) for r in rows])
    con.register("src_arrow", table)
    con.execute("CREATE TABLE src AS SELECT * FROM src_arrow")
    return con


def accepted_sql(spec: HoppingWindows) -> str:
    """The listens a window spec accepts: not late (watermark before it < its pane end + grace)
    and the first of their event id in their pane."""
    step, grace = spec.step_ms, spec.grace_ms
    return f"""
        WITH marked AS (
            SELECT *, coalesce(max(t) OVER (PARTITION BY "partition" ORDER BY "offset"
                ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), -1) AS w_before
            FROM src
        ), accepted AS (
            SELECT * FROM marked
            WHERE NOT control AND w_before < (t - t % {step}) + {step} + {grace}
        )
        SELECT *, t - t % {step} AS pane FROM accepted
        QUALIFY row_number() OVER (PARTITION BY user_id, event_id, t - t % {step} ORDER BY "offset") = 1
    """


def user_windows(con: duckdb.DuckDBPyConnection, spec: HoppingWindows, gap_ms: int) -> dict:
    """``{(user, window_start): (plays, distinct_artists, distinct_tracks, sessions,
    max_session_ms)}`` for every window with listens."""
    k = spec.panes_per_window
    sql = f"""
        WITH acc AS ({accepted_sql(spec)}),
        win AS (SELECT a.*, a.pane - r.k * {spec.step_ms} AS window_start
                FROM acc a, range(0, {k}) r(k)),
        gaps AS (SELECT *, CASE WHEN t - lag(t) OVER (PARTITION BY user_id, window_start ORDER BY t)
                                     <= {gap_ms} THEN 0 ELSE 1 END AS new_session FROM win),
        numbered AS (SELECT *, sum(new_session) OVER (PARTITION BY user_id, window_start ORDER BY t
                               ROWS UNBOUNDED PRECEDING) AS session FROM gaps),
        sessions AS (SELECT user_id, window_start, session, max(t) - min(t) AS length
                     FROM numbered GROUP BY ALL),
        counts AS (SELECT user_id, window_start, count(*) AS plays,
                          count(DISTINCT artist_id) AS artists, count(DISTINCT track_id) AS tracks
                   FROM win GROUP BY ALL)
        SELECT c.user_id, c.window_start, c.plays, c.artists, c.tracks,
               count(s.session) AS sessions, max(s.length) AS longest
        FROM counts c JOIN sessions s USING (user_id, window_start)
        GROUP BY ALL
    """
    return {(u, w): (p, a, t, s, m) for u, w, p, a, t, s, m in con.execute(sql).fetchall()}


def track_windows(con: duckdb.DuckDBPyConnection, spec: HoppingWindows, baseline_windows: int) -> dict:
    """``{(track, window_start): (plays, listeners, baseline_plays_total)}`` for every window
    with plays; the baseline is the plays in the ``baseline_windows`` sizes before the window."""
    k = spec.panes_per_window
    span = baseline_windows * spec.size_ms
    sql = f"""
        WITH acc AS ({accepted_sql(spec)}),
        win AS (SELECT a.*, a.pane - r.k * {spec.step_ms} AS window_start
                FROM acc a, range(0, {k}) r(k)),
        counts AS (SELECT track_id, window_start, count(*) AS plays,
                          count(DISTINCT user_id) AS listeners FROM win GROUP BY ALL)
        SELECT c.track_id, c.window_start, c.plays, c.listeners,
               (SELECT count(*) FROM acc a WHERE a.track_id = c.track_id
                  AND a.t >= c.window_start - {span} AND a.t < c.window_start) AS baseline
        FROM counts c
    """
    return {(tr, w): (p, n, b) for tr, w, p, n, b in con.execute(sql).fetchall()}


def affinity_listens(con: duckdb.DuckDBPyConnection, spec: HoppingWindows) -> list[tuple[str, int, str]]:
    """``(user, t, artist)`` of the listens the first spec accepts (what feeds the affinity)."""
    return con.execute(f"SELECT user_id, t, artist_id FROM ({accepted_sql(spec)})").fetchall()
