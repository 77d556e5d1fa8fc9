"""Where every record goes: its group before preprocessing, its chunk after. Pure functions.

Records are written once, as chunks, while they are preprocessed. Before preprocessing, each
split's records are ordered by a sha256 of (seed, record_id) and cut into groups of
`chunk_size` consecutive records: group g holds positions [g * chunk_size, (g + 1) *
chunk_size) (`group_starts`, `group_of`). One worker preprocesses a whole group and writes its
records, in order, as one chunk file.

A group whose records all succeed is a finished chunk: it keeps its bytes and takes its final
name at the commit. Failed records (dead letters) leave a group short, so `lay_out_chunks`
decides the final chunks once every group is done, keeping every chunk but the last of a split
exactly `chunk_size` records: chunk i is group i's records topped up with the last records of
the split's order (taken from its last groups backwards) until the two ends meet; what is left
between them is the last chunk. Only short chunks and the groups they borrow from are
reassembled; with no failures, every chunk is a group as written. The layout is a function of
the record ids, the seed, `chunk_size` and which records failed: the same for any bundling,
worker count or number of restarts.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import math
from typing import Optional, Sequence


def chunk_count(n_records: int, chunk_size: int) -> int:
    """How many chunks `n_records` records fill: ceil(n / chunk_size)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return math.ceil(n_records / chunk_size)


def record_order_key(seed: int, record_id: str) -> tuple[bytes, str]:
    """The record's place in its split's order (a stable hash, the same on every worker; the
    id breaks the tie of a collision)."""
    return hashlib.sha256(f"chunk:{seed}:{record_id}".encode()).digest(), record_id


def group_starts(keys: Sequence[tuple[bytes, str]], chunk_size: int) -> list[tuple[bytes, str]]:
    """The order key of the first record of each group of a split, from all its records'.

    Raises:
        ValueError: two records with one id (a record reached the layout twice).
    """
    ordered = sorted(keys)
    for before, after in zip(ordered, ordered[1:]):
        if before == after:
            raise ValueError(f"record {before[1]} reached the layout twice")
    chunk_count(len(ordered), chunk_size)  # validates chunk_size
    return ordered[::chunk_size]


def group_of(starts: Sequence[tuple[bytes, str]], key: tuple[bytes, str]) -> int:
    """The group of the record with order key `key`, given its split's `group_starts`."""
    index = bisect.bisect_right(starts, key) - 1
    if index < 0:
        raise ValueError(f"record {key[1]} sorts before its split's first group")
    return index


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """One final chunk: which records of which groups, in order, and where it goes.

    Attributes:
        split, index, count: the chunk's place (`{split}-{index}-of-{count}.pt`).
        parts: (group, first, end) slices of the groups' written records, in chunk order.
        group: the group whose written file is this chunk as it stands (renamed, not
            rewritten), or None when the chunk is assembled from `parts`.
    """

    split: str
    index: int
    count: int
    parts: tuple[tuple[int, int, int], ...]
    group: Optional[int]

    @property
    def records(self) -> int:
        return sum(end - first for _, first, end in self.parts)


def lay_out_chunks(split: str, written: Sequence[int], chunk_size: int) -> list[ChunkPlan]:
    """The final chunks of a split whose group g wrote `written[g]` records (module docstring).

    Every chunk but the last holds exactly `chunk_size` records; a group that lost no record
    and lends none is its own chunk (`ChunkPlan.group`).
    """
    groups = len(written)
    total = sum(written)
    count = chunk_count(total, chunk_size)
    plans: list[ChunkPlan] = []
    back_group, back_end = groups - 1, written[-1] if groups else 0  # the pool's end
    lent = [0] * groups  # records each group lends from its end to earlier chunks

    def take(need: int) -> list[tuple[int, int, int]]:
        """`need` records from the pool's end, backwards over the groups, in chunk order."""
        nonlocal back_group, back_end
        taken = []
        while need:
            if back_end == 0:
                back_group -= 1
                back_end = written[back_group]
                continue
            n = min(need, back_end)
            taken.append((back_group, back_end - n, back_end))
            lent[back_group] += n
            back_end -= n
            need -= n
        return taken[::-1]

    for g in range(groups):
        # Records left from group g's start to the pool's end.
        left = sum(written[g:back_group]) + back_end if g <= back_group else 0
        if left <= 0:
            break
        own = written[g] if g < back_group else back_end
        if left <= chunk_size:  # the ends meet: what is left is the split's last chunk
            parts = [(g, 0, own)] if own else []
            parts += [(h, 0, written[h] - lent[h]) for h in range(g + 1, back_group)]
            if back_group > g and back_end:
                parts.append((back_group, 0, back_end))
            parts = [p for p in parts if p[2] > p[1]]
            whole = len(parts) == 1 and parts[0] == (g, 0, written[g]) and not lent[g]
            plans.append(ChunkPlan(split, len(plans), count, tuple(parts), g if whole else None))
            break
        parts = ([(g, 0, own)] if own else []) + take(chunk_size - own)
        whole = own == written[g] == chunk_size
        plans.append(ChunkPlan(split, len(plans), count, tuple(parts), g if whole else None))
    if len(plans) != count or sum(p.records for p in plans) != total:
        raise AssertionError(f"the {split} layout lost records: {len(plans)} chunks of "
                             f"{sum(p.records for p in plans)} for {total}")
    return plans
