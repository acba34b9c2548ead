"""Key-range planning and per-row decisions of a run: pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from numbers import Number
from typing import TypeVar


@dataclass(frozen=True)
class KeyRange:
    """The ids that one Spark task reads: above `after` (None: from the first row) up to `hi`, inclusive, in the
    database's own order of the id column (integers, text under its collation, UUIDs as the server sorts them)."""

    index: int
    after: Hashable | None
    hi: Hashable


def split_ends(rows: int, parts: int) -> list[int]:
    """The last 0-based position of each of at most `parts` contiguous parts of `rows` rows, sizes within one."""
    parts = max(1, min(parts, rows))
    width, extra = divmod(rows, parts)
    ends, end = [], -1
    for i in range(parts if rows > 0 else 0):
        end += width + (1 if i < extra else 0)
        ends.append(end)
    return ends


def ranges_ending_at(ends: list[Hashable]) -> list[KeyRange]:
    """Contiguous ranges, each ending at one of the ids `ends` (ascending in the database's order: the last of
    each range's rows), the first from the first row; an end equal to the one before adds no range."""
    ranges: list[KeyRange] = []
    for end in ends:
        if not ranges or end != ranges[-1].hi:
            ranges.append(KeyRange(len(ranges), ranges[-1].hi if ranges else None, end))
    return ranges


def repeated_id(previous: Hashable | None, ids: list[Hashable]) -> Hashable | None:
    """The first id of a chunk read in id order that equals the one before it (`previous` ends the chunk before),
    i.e. one that a second row shares; None when every id is its row's own. The database sorts, so equal ids are
    neighbours; Python's order of text or UUIDs need not be the server's, so only equality is asked."""
    for row_id in ids:
        if previous is not None and row_id == previous:
            return row_id
        previous = row_id
    return None


def shown_id(row_id: Hashable) -> str:
    """A row id as an error names it: a number as it is, any other key quoted with its escapes. A key imported from
    a CSV with its line's carriage return, `T-1\\r`, had been named as T-1, which no query finds."""
    return str(row_id) if isinstance(row_id, Number) else repr(str(row_id))


def needs_vector(text: str | None, text_hash: str | None, stored_hash: str | None,
                 stored_model: str | None, model: str, mode: str) -> bool:
    """Whether a row is embedded in this run: new, changed, another model, or a full run."""
    if text is None:
        return False
    if mode == "full":
        return True
    return stored_hash is None or stored_hash != text_hash or stored_model != model


MIN_RANGE_ROWS = 500  # below this a range costs more to plan and schedule than it evens out
# A task sorts each chunk it reads by length before batching, so a range is also a sort window: a task's
# 593-row range padded 6.4 % of its tokens, a 1,250-row one 3.3 %. The 5,000-row pipeline in 4 ranges read in
# one chunk each ran 1.03x the rows/s of 8 ranges (356 against 345, four alternations).
SORT_WINDOW_ROWS = 1000


def default_partitions(cores: int, rows: int) -> int:
    """Key ranges for a run over `rows` rows, always a whole number per core so that no last range runs alone:
    two per core where each keeps MIN_RANGE_ROWS, so a slow worker's share moves to the others (one range
    per core read 1.78-1.80 on two workers against one in full benches), and up to 4 per core while each
    keeps SORT_WINDOW_ROWS. A 200-row run in 8 ranges spent 0.7 s planning them on 2 cores and committed its
    first vector after 1.1-1.2 s; in 2 ranges, 0.2 s and 0.5-0.6 s (the run service, warm)."""
    balanced = 2 if rows >= 2 * cores * MIN_RANGE_ROWS else 1
    return max(2, cores * max(balanced, min(4, rows // (cores * SORT_WINDOW_ROWS))))


COMMIT_ROWS = 256  # rows per transaction: each worker's progress shows every few seconds
# A task's first commit: this many of its shortest rows alone, so that vectors land within a second of its start.
# On one fp32 core of an AVX2-only EPYC the 32 shortest of 200 demo rows took 0.41-0.56 s to encode, 8 of them
# 0.07-0.11 s.
FIRST_COMMIT_ROWS = 8


def encode_spans(n: int, batch_size: int, first_commit: bool) -> list[tuple[slice, int]]:
    """How a length-sorted chunk of n rows is encoded and committed: spans encoded in one pass of batches each,
    with the rows a commit gathers at least. A task's first commit is its FIRST_COMMIT_ROWS shortest rows
    alone (vectors land within a second); the rest is one pass whose batches commit COMMIT_ROWS rows or more
    at a time (256-row slices encoded apart cost a task in a Spark worker 2.5 % of its rows/s)."""
    head = min(n, batch_size, FIRST_COMMIT_ROWS) if first_commit else 0
    return ([(slice(0, head), head)] if head else []) + ([(slice(head, n), COMMIT_ROWS)] if n > head else [])


T = TypeVar("T")


def gather(pieces: Iterable[T], rows: Callable[[T], int], at_least: int) -> Iterator[list[T]]:
    """Consecutive pieces in groups of at least `at_least` rows each, as they come; the last may hold fewer."""
    group, held = [], 0
    for piece in pieces:
        group.append(piece)
        held += rows(piece)
        if held >= at_least:
            yield group
            group, held = [], 0
    if group:
        yield group
