"""Key-range planning and per-row decisions of a run: pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar


@dataclass(frozen=True)
class KeyRange:
    """Inclusive id range [lo, hi] that one Spark task reads."""

    index: int
    lo: int
    hi: int


def split_range(lo: int, hi: int, parts: int) -> list[KeyRange]:
    """Split [lo, hi] into at most `parts` contiguous, non-overlapping, covering ranges."""
    if hi < lo:
        return []
    parts = max(1, min(parts, hi - lo + 1))
    width, extra = divmod(hi - lo + 1, parts)
    ranges, start = [], lo
    for i in range(parts):
        end = start + width - 1 + (1 if i < extra else 0)
        ranges.append(KeyRange(i, start, end))
        start = end + 1
    return ranges


def ranges_ending_at(ends: list[int]) -> list[KeyRange]:
    """Contiguous inclusive ranges from ends[0], each ending at one of the later ends (ascending ids: the first
    row's, then the last of each range's rows); an end that does not rise adds no range."""
    ranges, start = [], ends[0] if ends else 0
    for end in ends[1:]:
        if end >= start:
            ranges.append(KeyRange(len(ranges), start, end))
            start = end + 1
    return ranges


def repeated_id(previous: int | None, ids: list[int]) -> int | None:
    """The first id of a chunk read in id order that is not above the one before it (`previous` ends the chunk
    before), i.e. one that a second row shares; None when every id is its row's own."""
    for row_id in ids:
        if previous is not None and row_id <= previous:
            return row_id
        previous = row_id
    return None


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
FIRST_COMMIT_ROWS = 32  # a task's first commit: this many of its shortest rows, encoded in a fraction of a second


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
