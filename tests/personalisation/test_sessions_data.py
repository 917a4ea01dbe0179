"""Reading 30Music-layout files into sessions: play order, the optional split column, clear errors
with file and line, the last-window split, and the round trip through write_sessions."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.errors import BackbeatError
from personalisation.sessions_data import (
    SessionDataError,
    parse_sessions,
    read_sessions,
    split_last_window,
    write_sessions,
)

HEADER = "UserId\tSessionId\tItemId\tTime\tArtistId\tsplit"


def rows(*lines: str) -> list[str]:
    return [HEADER, *lines]


def test_sessions_in_play_order_and_start_order():
    sessions = parse_sessions(
        rows(
            "1\t10\t100\t500\t7\tw2",
            "2\t20\t200\t100\t8\tw1",
            "1\t10\t101\t400\t7\tw2",  # earlier than line 2 of the session: goes first
            "1\t10\t102\t500\t7\tw2",  # same time as the first row: file order kept
            "",
        )
    )
    assert [s.session_id for s in sessions] == ["20", "10"]
    s10 = sessions[1]
    assert s10.items == ("101", "100", "102") and s10.times == (400, 500, 500)
    assert (s10.user_id, s10.split, s10.start, s10.end, s10.line) == ("1", "w2", 400, 500, 2)


def test_split_column_is_optional():
    sessions = parse_sessions(["UserId\tSessionId\tItemId\tTime\tArtistId", "1\t10\t100\t500\t7"])
    assert sessions[0].split == "" and sessions[0].items == ("100",)


@pytest.mark.parametrize(
    ("lines", "line", "words"),
    [
        (["user\ttime\ttrack"], 1, "not a 30Music-layout file"),
        ([], 1, "empty"),
        (rows("1\t10\t100\t500\t7\tw", "1\t10\t100\t500"), 3, "expected 6 tab-separated columns, got 4"),
        (rows("1\t10\t100\tyesterday\t7\tw"), 2, "Time is not unix seconds"),
        (rows("1\t10\t100\t5²\t7\tw"), 2, "Time is not unix seconds"),
        (rows("1\t10\t100\t-5\t7\tw"), 2, "Time is not unix seconds"),
        (rows("1\t10\t\t500\t7\tw"), 2, "must not be empty"),
        (rows("1\t10\t100\t500\t7\tw", "2\t10\t101\t501\t7\tw"), 3, "rows of user 1 (line 2) and of user 2"),
        (
            rows("1\t10\t100\t500\t7\tw1", "1\t10\t101\t501\t7\tw2"),
            3,
            "in split 'w1' (line 2) and in split 'w2'",
        ),
    ],
)
def test_malformed_input_names_file_and_line(lines, line, words):
    with pytest.raises(SessionDataError) as info:
        parse_sessions(lines, "x.tsv")
    assert isinstance(info.value, BackbeatError)
    assert info.value.line == line and f"x.tsv, line {line}: " in str(info.value)
    assert words in str(info.value)


def test_read_sessions_reports_bad_bytes_and_missing_files(tmp_path: Path):
    bad = tmp_path / "bad.tsv"
    bad.write_bytes((HEADER + "\n1\t10\t100\t500\t7\tw\n1\t10\t1\xff0\t501\t7\tw\n").encode("latin-1"))
    with pytest.raises(SessionDataError, match=r"bad.tsv, line 3: not UTF-8"):
        read_sessions(bad)
    with pytest.raises(SessionDataError, match="cannot read the file"):
        read_sessions(tmp_path / "missing.tsv")


def test_last_window_by_time_not_by_label():
    sessions = parse_sessions(
        rows(
            "1\t10\t100\t900\t7\ta",  # label "a" is the latest window
            "1\t11\t101\t100\t7\tb",
            "2\t12\t102\t200\t7\tc",
            "2\t13\t103\t950\t7\ta",
        )
    )
    split = split_last_window(sessions)
    assert split.test_window == "a" and split.train_windows == ("b", "c")
    assert [s.session_id for s in split.test] == ["10", "13"]
    assert [s.session_id for s in split.train] == ["11", "12"]


def test_last_window_needs_a_split_column_and_two_windows():
    with pytest.raises(SessionDataError, match="no 'split' column"):
        split_last_window(parse_sessions(["UserId\tSessionId\tItemId\tTime\tArtistId", "1\t10\t100\t5\t7"]))
    with pytest.raises(SessionDataError, match="only one time window"):
        split_last_window(parse_sessions(rows("1\t10\t100\t5\t7\tw")))


def test_write_then_read_gives_the_same_sessions(tmp_path: Path):
    sessions = parse_sessions(
        rows("1\t10\t100\t500\t7\tw2", "2\t20\t200\t100\t8\tw1", "1\t10\t101\t400\t9\tw2")
    )
    path = tmp_path / "deep" / "out.tsv"
    assert write_sessions(path, sessions) == 3
    again = read_sessions(path)
    assert [(s.session_id, s.items, s.times, s.artists, s.split) for s in again] == [
        (s.session_id, s.items, s.times, s.artists, s.split) for s in sessions
    ]
