"""benchmarks/bench_peers.py converts our records faithfully: a record read back through
MosaicML Streaming's and LitData's own datasets equals ours.

Skipped unless both peers are installed; they are benchmark-only and conflict with the
project's pins, so they live in a virtual environment of their own (see bench_peers.py):
    PYTHONPATH=. .venv-peers/bin/python -m pytest -q tests/test_bench_peers.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("streaming", reason="mosaicml-streaming not installed (benchmark-only)")
pytest.importorskip("litdata", reason="litdata not installed (benchmark-only)")

from benchmarks.bench_peers import (  # noqa: E402
    COLUMNS,
    open_dataset,
    shard_starts,
    source_records,
    to_litdata,
    to_mds,
)
from tests.chunk_fixtures import write_dataset  # noqa: E402
from transforms.chunks import ChunkedDataset  # noqa: E402

N = 10  # our chunks of 4: 4, 4, 2


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("peers")
    write_dataset(root / "ours", {"train": N, "val": 0, "test": 0}, chunk_size=4,
                  image_size=32)
    ours = str(root / "ours")
    to_mds(source_records(ours), str(root / "mds"), size_limit=1 << 26)
    to_litdata(source_records(ours), str(root / "litdata"), chunk_size=4)
    return {"ours": ours, "mds": str(root / "mds"), "litdata": str(root / "litdata")}


@pytest.mark.parametrize("system", ["mds", "litdata"])
@pytest.mark.parametrize("image_dtype", [torch.float32, torch.uint8])
def test_a_record_read_through_a_peer_equals_ours(copies: dict, system: str,
                                                  image_dtype: torch.dtype) -> None:
    ours = ChunkedDataset(copies["ours"], "train", mode="map", image_dtype=image_dtype,
                          columns=COLUMNS)
    peer = open_dataset(system, copies[system], image_dtype, batch_size=4, shuffle=False)
    assert len(peer) == N
    for i in (0, 6):  # in the first chunk and in another
        mine, theirs = ours[i], peer[i]
        assert set(theirs) == set(COLUMNS) and theirs["record_id"] == mine["record_id"]
        for key in COLUMNS[1:]:
            assert theirs[key].dtype == mine[key].dtype, key
            torch.testing.assert_close(theirs[key], mine[key], rtol=0, atol=1e-6,
                                       equal_nan=True, msg=key)


def test_chunk_boundaries_come_from_each_index(copies: dict) -> None:
    assert shard_starts("ours", copies["ours"]) == [0, 4, 8]
    assert shard_starts("litdata", copies["litdata"]) == [0, 4, 8]
    assert shard_starts("mds", copies["mds"]) == [0]  # one shard: under its byte limit
