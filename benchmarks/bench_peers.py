"""Side by side: ChunkedDataset against MosaicML Streaming (MDS) and LitData, same records.

Our benchmark chunks (`bench_loader.write_output`: 50 records a chunk, 518 x 518 images,
300-800 tokens) are converted, record for record and in order, to MDS shards and to LitData
chunks of the same size (50 records; MDS cuts shards by bytes, so its `size_limit` is our
largest chunk's bytes). Each is read with its own dataset through a torch DataLoader with
`collate_records`, shuffled (each library's default shuffle otherwise), every configuration in
a fresh subprocess:

- records/s over the epoch after the first batch, with 0, 1 and 2 workers, for float32
  [3, S, S] normalised images and for uint8 [1, S, S] (the peers' records go through the
  same `normalize_images` that our float mode's arithmetic matches);
- first-batch latency (from building the dataset to the first batch);
- peak RSS of the process tree (VmRSS summed, mapped file pages included in each process);
- shuffle reach: distinct chunks (shards) per batch, from the record ids delivered.

The peers are for this benchmark only, not in any requirements file. Install them in a
virtual environment of their own: mosaicml-streaming 0.13 pins transformers<5 and numpy<2.2,
against the project's pins, and a plain `pip install` of either replaces torch 2.13.0 with
the newest CUDA build:

    python3 -m venv .venv-peers
    .venv-peers/bin/pip install torch==2.13.0 'torchvision==0.28.*' mosaicml-streaming litdata
    PYTHONPATH=. .venv-peers/bin/python benchmarks/bench_peers.py --chunks 32 --batch_size 32
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.memory import PeakSampler  # noqa: E402
from transforms.chunks import ChunkedDataset, collate_records, normalize_images  # noqa: E402

SYSTEMS = ("ours", "ours_2_chunks", "mds", "litdata")
# At equal memory: ours with a shuffle window of two chunks holds about what LitData does (one
# chunk per process, plus the one being read), against its default window of 4,096 records.
SMALL_WINDOW_CHUNKS = 2
# The fields a training step reads (what `examples/train.py` loads), in our training form.
COLUMNS = ("record_id", "image_tensor", "text_input_ids", "text_attention_mask",
           "clinical_data", "clinical_mask", "labels")


def source_records(out_dir: str) -> Iterator[dict]:
    """Our records in stored order, as the peers store them: numpy, uint8 grey images."""
    ds = ChunkedDataset(out_dir, "train", mode="map", image_dtype=torch.uint8, columns=COLUMNS)
    for i in range(len(ds)):
        r = ds[i]
        yield {
            "record_id": r["record_id"],
            "image": r["image_tensor"][0].numpy(),
            "text_input_ids": r["text_input_ids"].to(torch.int32).numpy(),
            "clinical_data": r["clinical_data"].numpy(),
            "clinical_mask": r["clinical_mask"].to(torch.uint8).numpy(),
            "labels": r["labels"].numpy(),
        }


def to_mds(records: Iterator[dict], out: str, size_limit: int) -> None:
    from streaming import MDSWriter

    first = next(records)
    size = ",".join(str(s) for s in first["image"].shape)
    columns = {"record_id": "str", "image": f"ndarray:uint8:{size}",
               "text_input_ids": "ndarray:int32", "clinical_data": "ndarray:float32",
               "clinical_mask": "ndarray:uint8", "labels": "ndarray:float32"}
    with MDSWriter(out=out, columns=columns, size_limit=size_limit) as writer:
        writer.write(first)
        for record in records:
            writer.write(record)


def to_litdata(records: Iterator[dict], out: str, chunk_size: int) -> None:
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(out, chunk_size=chunk_size)
    for i, record in enumerate(records):
        writer[i] = record
    writer.done()
    writer.merge()


class TrainingForm:
    """A peer's stored sample -> our training record (`COLUMNS`), images as `image_dtype`."""

    def __init__(self, image_dtype: torch.dtype) -> None:
        self.image_dtype = image_dtype

    def __call__(self, sample: dict) -> dict:
        image = torch.as_tensor(np.asarray(sample["image"]))[None]
        if self.image_dtype != torch.uint8:
            image = normalize_images(image, dtype=self.image_dtype)
        ids = torch.as_tensor(np.asarray(sample["text_input_ids"]), dtype=torch.int64)
        return {
            "record_id": sample["record_id"],
            "image_tensor": image,
            "text_input_ids": ids,
            "text_attention_mask": torch.ones_like(ids),
            "clinical_data": torch.as_tensor(np.asarray(sample["clinical_data"])),
            "clinical_mask": torch.as_tensor(np.asarray(sample["clinical_mask"])).bool(),
            "labels": torch.as_tensor(np.asarray(sample["labels"])),
        }


def open_dataset(system: str, path: str, image_dtype: torch.dtype, batch_size: int,
                 shuffle: bool = True) -> torch.utils.data.Dataset:
    """The system's own dataset over its copy, yielding our training records."""
    form = TrainingForm(image_dtype)
    if system in ("ours", "ours_2_chunks"):
        from benchmarks.bench_loader import RECORDS_PER_CHUNK

        window = ({"shuffle_window": SMALL_WINDOW_CHUNKS * RECORDS_PER_CHUNK}
                  if system == "ours_2_chunks" else {})
        return ChunkedDataset(path, "train", seed=0, batch_size=batch_size, shuffle=shuffle,
                              image_dtype=image_dtype, columns=COLUMNS, **window)
    if system == "mds":
        from streaming import StreamingDataset

        class _MDS(StreamingDataset):
            def get_item(self, idx: int, *args: Any, **kwargs: Any) -> Any:
                return form(super().get_item(idx, *args, **kwargs))

        return _MDS(local=path, shuffle=shuffle, batch_size=batch_size)
    if system == "litdata":
        import litdata

        return litdata.StreamingDataset(path, shuffle=shuffle, transform=form)
    raise ValueError(f"system must be one of {SYSTEMS}, got {system!r}")


def shard_starts(system: str, path: str) -> list[int]:
    """The first record (stored order) of each chunk or shard, from the system's index."""
    if system in ("ours", "ours_2_chunks"):
        counts = [c["records"] for c in json.loads(Path(path, "metadata.json").read_text())
                  ["chunks"]]
    elif system == "mds":
        counts = [s["samples"] for s in json.loads(Path(path, "index.json").read_text())
                  ["shards"]]
    else:
        counts = [c["chunk_size"] for c in json.loads(Path(path, "index.json").read_text())
                  ["chunks"]]
    return [int(x) for x in np.cumsum([0, *counts])[:-1]]


def measure(system: str, path: str, workers: int, image_dtype: str, batch_size: int) -> dict:
    """One configuration in this (fresh) process: a whole shuffled epoch."""
    # Imported before the clocks start, as ours is: first batch and CPU time are reading.
    if system == "mds":
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
    elif system == "litdata":
        import litdata  # noqa: F401
    starts = shard_starts(system, path)
    cpu0 = _cpu(resource.RUSAGE_SELF)
    position = {}  # record id -> stored order, as written by bench_loader: n in hex
    t0 = time.perf_counter()
    ds = open_dataset(system, path, getattr(torch, image_dtype), batch_size)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate_records)
    it = iter(loader)
    batch = next(it)
    first = time.perf_counter() - t0
    reach = []
    seen = timed = 0
    t1 = time.perf_counter()
    while batch is not None:
        ids = batch["record_id"]
        n = [position.setdefault(r, int(r.split("-")[0], 16)) for r in ids]
        if len(ids) == batch_size:
            reach.append(len({bisect.bisect_right(starts, k) - 1 for k in n}))
        seen += len(ids)
        batch = next(it, None)
        if batch is not None:
            timed += len(batch["record_id"])
    elapsed = time.perf_counter() - t1
    del it, loader  # joins the workers: their CPU time then counts as children's
    cpu = _cpu(resource.RUSAGE_SELF) - cpu0 + _cpu(resource.RUSAGE_CHILDREN)
    return {"system": system, "workers": workers, "image_dtype": image_dtype,
            "records": seen, "distinct": len(position), "first_batch_s": round(first, 3),
            "records_per_s": round(timed / elapsed, 1),
            # Less disturbed by other work on the machine than records/s: the epoch's records
            # per CPU-second of this process and its workers.
            "records_per_cpu_s": round(seen / cpu, 1),
            "chunks_per_batch_mean": round(float(np.mean(reach)), 1),
            "chunks_per_batch_min": int(min(reach)),
            "loadavg_1min": round(os.getloadavg()[0], 2)}


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_measured(system: str, path: str, workers: int, image_dtype: str,
                 batch_size: int) -> dict:
    cmd = [sys.executable, __file__, "--_measure", system, path, "--workers", str(workers),
           "--image_dtype", image_dtype, "--batch_size", str(batch_size)]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                # One intra-op thread, as in DataLoader workers: on a busy
                                # 2-core machine, OpenMP threads of the main process spin.
                                env=os.environ | {"PYTHONPATH": str(REPO),
                                                  "OMP_NUM_THREADS": "1"})
        with PeakSampler(proc.pid, interval=0.05) as sampler:
            code = proc.wait()
        log.seek(0)
        text = log.read()
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{text}")
    result = json.loads(text.strip().splitlines()[-1])
    return result | {"peak_rss_mb": round(sampler.peak / 2**20)}


def convert(root: Path, n_chunks: int) -> dict[str, str]:
    """Our chunks and the peers' copies of them; the seconds each conversion took."""
    from benchmarks.bench_loader import IMAGE_SIZE, RECORDS_PER_CHUNK, write_output

    paths = {s: str(root / s) for s in SYSTEMS} | {"ours_2_chunks": str(root / "ours")}
    write_output(root / "ours", n_chunks, IMAGE_SIZE)
    largest = max(c["bytes"] for c in json.loads((root / "ours" / "metadata.json")
                                                 .read_text())["chunks"])
    t = time.perf_counter()
    to_mds(source_records(paths["ours"]), paths["mds"], size_limit=largest)
    mds_s = time.perf_counter() - t
    t = time.perf_counter()
    to_litdata(source_records(paths["ours"]), paths["litdata"], RECORDS_PER_CHUNK)
    lit_s = time.perf_counter() - t
    sizes = {s: sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file()) / 2**20
             for s, p in paths.items()}
    print(json.dumps({"conversion_s": {"mds": round(mds_s, 1), "litdata": round(lit_s, 1)},
                      "size_mb": {s: round(v) for s, v in sizes.items()}}), flush=True)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, default=32, help="chunks of 50 records")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--image_dtypes", nargs="*", default=["float32", "uint8"])
    p.add_argument("--systems", nargs="*", default=list(SYSTEMS))
    p.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--image_dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._measure:
        system, path = args._measure
        print(json.dumps(measure(system, path, args.workers[0], args.image_dtype,
                                 args.batch_size)))
        return
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    root = Path(tempfile.mkdtemp(prefix="bench_peers_"))
    try:
        paths = convert(root, args.chunks)
        for image_dtype in args.image_dtypes:
            for workers in args.workers:
                for system in args.systems:
                    print(json.dumps(run_measured(system, paths[system], workers,
                                                  image_dtype, args.batch_size)), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
