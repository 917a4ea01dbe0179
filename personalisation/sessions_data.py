"""Listening sessions from files in the 30Music layout, for offline evaluation of recommenders.

The layout is the one of ``data/listens_30music_2014.tsv.gz`` (the 30Music "200ks" session
slices as the session-rec framework ships them, plus a ``split`` column): tab-separated, a header
``UserId SessionId ItemId Time ArtistId [split]``, ``Time`` in unix seconds, sessions as cut by
the data set's authors. Parsing (:func:`parse_sessions`) and splitting (:func:`split_last_window`)
are pure; :func:`read_sessions` (plain or gzip) and :func:`write_sessions` are the file I/O around
them. A malformed file raises :class:`SessionDataError` naming the file and the line.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from infra.errors import BackbeatError
from infra.resources import read_data_bytes

#: The header of a 30Music-layout file; the sixth column (``split``) is optional.
HEADER = ("UserId", "SessionId", "ItemId", "Time", "ArtistId", "split")


class SessionDataError(BackbeatError):
    """A sessions file is malformed; ``source`` is the file and ``line`` the 1-based line number
    (0 when the problem is not one line, e.g. a file with a single time window)."""

    def __init__(self, source: str, line: int, problem: str, hint: str = "") -> None:
        where = f"{source}, line {line}" if line else source
        super().__init__(f"{where}: {problem}" + (f"; {hint}" if hint else ""))
        self.source = source
        self.line = line


@dataclass(frozen=True)
class Session:
    """One listening session: tracks in play order (by ``Time``, then file order for ties).

    ``items``, ``times`` (unix seconds) and ``artists`` have one entry per play; ``split`` is the
    file's ``split`` label (e.g. ``test3``), empty when the file has no such column; ``line`` is
    the line of the session's first row (for messages).
    """

    user_id: str
    session_id: str
    split: str
    items: tuple[str, ...]
    times: tuple[int, ...]
    artists: tuple[str, ...]
    line: int = 0

    @property
    def start(self) -> int:
        """Unix seconds of the first play."""
        return self.times[0]

    @property
    def end(self) -> int:
        """Unix seconds of the last play."""
        return self.times[-1]


@dataclass
class _Builder:
    user_id: str
    split: str
    line: int
    rows: list[tuple[int, int, str, str]] = field(default_factory=list)  # (time, line, item, artist)


def parse_sessions(lines: Iterable[str], source: str = "<input>") -> list[Session]:
    """Parse the lines of a 30Music-layout file (header first) into sessions, ordered by start
    time (ties: first appearance in the file). Blank lines are skipped.

    Rows of one session need not be adjacent nor sorted: a session's plays are ordered by
    ``Time``, ties kept in file order.

    Raises:
        SessionDataError: no header or a different one; a row without 5 or 6 tab-separated
            columns; an empty id; a ``Time`` that is not a non-negative integer (unix seconds);
            one session id with rows of two users or of two ``split`` labels.
    """
    numbered = enumerate(lines, start=1)
    first = next(numbered, None)
    if first is None:
        raise SessionDataError(source, 1, "the file is empty", f"expected the header {' '.join(HEADER)!r}")
    header = tuple(first[1].rstrip("\r\n").split("\t"))
    if header not in (HEADER, HEADER[:5]):
        raise SessionDataError(
            source,
            1,
            f"not a 30Music-layout file: the header is {first[1].rstrip()[:80]!r}",
            f"expected the tab-separated header {' '.join(HEADER)!r} (split optional)",
        )
    width = len(header)
    builders: dict[str, _Builder] = {}
    for number, raw in numbered:
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != width:
            problem = f"expected {width} tab-separated columns, got {len(cols)}"
            raise SessionDataError(source, number, problem, "fix or drop the row")
        user, session, item, time_s, artist = (c.strip() for c in cols[:5])
        split = cols[5].strip() if width == 6 else ""
        if not (user and session and item and artist):
            raise SessionDataError(source, number, "UserId, SessionId, ItemId and ArtistId must not be empty")
        if not (time_s.isascii() and time_s.isdigit()):
            raise SessionDataError(source, number, f"Time is not unix seconds: {time_s!r}")
        b = builders.get(session)
        if b is None:
            b = builders[session] = _Builder(user, split, number)
        elif b.user_id != user:
            raise SessionDataError(
                source,
                number,
                f"session {session} has rows of user {b.user_id} (line {b.line}) and of user {user}",
                "session ids must be unique per user",
            )
        elif b.split != split:
            raise SessionDataError(
                source,
                number,
                f"session {session} is in split {b.split!r} (line {b.line}) and in split {split!r}",
                "a session must lie in one time window",
            )
        b.rows.append((int(time_s), number, item, artist))
    sessions = []
    for session_id, b in builders.items():
        rows = sorted(b.rows)
        sessions.append(
            Session(
                user_id=b.user_id,
                session_id=session_id,
                split=b.split,
                items=tuple(r[2] for r in rows),
                times=tuple(r[0] for r in rows),
                artists=tuple(r[3] for r in rows),
                line=b.line,
            )
        )
    sessions.sort(key=lambda s: (s.start, s.line))
    return sessions


def read_sessions(path: Path) -> list[Session]:
    """Read a 30Music-layout TSV file (UTF-8, plain or gzip) into sessions, see :func:`parse_sessions`.

    Raises:
        SessionDataError: the file is missing, not UTF-8, or malformed (with the line).
    """
    try:
        text = read_data_bytes(path)
    except OSError as exc:
        raise SessionDataError(str(path), 0, f"cannot read the file: {exc.strerror or exc}") from None
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = text[: exc.start].count(b"\n") + 1
        raise SessionDataError(str(path), line, f"not UTF-8 text: {exc.reason}") from None
    return parse_sessions(decoded.splitlines(), str(path))


@dataclass(frozen=True)
class WindowSplit:
    """Sessions split by time window: ``test`` is the last window, ``train`` all earlier ones."""

    train: list[Session]
    test: list[Session]
    train_windows: tuple[str, ...]
    test_window: str


def split_last_window(sessions: Sequence[Session], source: str = "<input>") -> WindowSplit:
    """Split by the ``split`` column: the window whose first play is latest is the test set, the
    others the training set (windows ordered by time, not by label).

    Raises:
        SessionDataError: the sessions carry no ``split`` label, or only one window.
    """
    starts: dict[str, int] = {}
    for s in sessions:
        if not s.split:
            raise SessionDataError(
                source,
                s.line,
                "the file has no 'split' column to choose a test window from",
                "pass --train FILE --test FILE, or add a split column (e.g. test0..test3)",
            )
        starts[s.split] = min(starts.get(s.split, s.start), s.start)
    windows = sorted(starts, key=lambda w: (starts[w], w))
    if len(windows) < 2:
        raise SessionDataError(
            source,
            0,
            f"only one time window ({', '.join(windows) or 'none'}); need an earlier one to train on",
            "pass --train FILE --test FILE",
        )
    last = windows[-1]
    return WindowSplit(
        train=[s for s in sessions if s.split != last],
        test=[s for s in sessions if s.split == last],
        train_windows=tuple(windows[:-1]),
        test_window=last,
    )


def format_sessions(sessions: Iterable[Session]) -> Iterator[str]:
    """Lines (without newline) of a 30Music-layout file with the ``split`` column: the header,
    then each session's plays in play order (what :func:`parse_sessions` reads back)."""
    yield "\t".join(HEADER)
    for s in sessions:
        for item, time_s, artist in zip(s.items, s.times, s.artists, strict=True):
            yield f"{s.user_id}\t{s.session_id}\t{item}\t{time_s}\t{artist}\t{s.split}"


def write_sessions(path: Path, sessions: Iterable[Session]) -> int:
    """Write ``sessions`` to ``path`` in the 30Music layout (UTF-8, ``\\n`` line ends); returns
    the number of plays written. Parent directories are created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with path.open("w", encoding="utf-8", newline="\n") as out:
        for line in format_sessions(sessions):
            out.write(line + "\n")
            rows += 1
    return rows - 1
