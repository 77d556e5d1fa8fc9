"""Benchmark of ChunkedDataset on local chunks: throughput, first batch, peak memory.

Writes chunks of 50 records with 518 x 518 images (smooth anatomy-like content plus noise) and
texts of 300-800 tokens to a temporary directory, then measures, each configuration in a fresh
subprocess so that peak memory is its own:

- records/s through a DataLoader (float32 [3, 518, 518] images, collate_records batches) with
  num_workers 0, 1 and 2, and per worker process;
- time from building the DataLoader iterator to the first batch;
- peak RSS (VmHWM) of the loading process(es) over a whole epoch of 5 and of 50 chunks;
- the alternatives for the uint8 -> normalised float hot path, and chunk opening with and
  without mmap;
- bfloat16 and uint8 (`image_dtype`) deliveries, and the ceiling of any worker handing over
  float32 images: ms per image to fill fresh shared memory (vs private memory), and
  `normalize_images` on this CPU;
- `columns=` (labels and ids only) against whole records;
- the shuffle's reach: distinct chunks per batch for the former default window (2 chunks)
  and the default (4096 records), from the epoch order alone, and the memory a window holds;
- gs:// from a local gcp-storage-emulator, with and without `prefetch`: first batch and
  records/s over an epoch, for windows of 2 chunks and the default; over loopback and over a
  link shaped like GCS from a VM in its region (a proxy that delays each response's first byte
  and throttles each stream: by default 50 ms and 100 MB/s).

Run:  .venv/bin/python benchmarks/bench_loader.py [--chunks 50] [--records 1000]
          [--sections throughput,epoch,columns,shuffle,gcs] [--gcs_latency_ms 50]
          [--gcs_mb_per_s 100]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import math
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transforms.chunks import FORMAT_VERSION, chunk_relpath, encode_chunk  # noqa: E402

RECORDS_PER_CHUNK = 50
IMAGE_SIZE = 518
N_FEATURES = 40


def _record(n: int, split: str, size: int) -> dict:
    gen = torch.Generator().manual_seed(n)
    height = size - 64 * (n % 2)  # half of them letterboxed
    top = (size - height) // 2
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, size),
                            indexing="ij")
    body = 150 + 80 * torch.cos(2.5 * xx) * torch.cos(1.5 * yy)
    noise = torch.randn(height, size, generator=gen) * 20
    image = torch.zeros(size, size, dtype=torch.uint8)
    image[top : top + height] = (body + noise).clamp(0, 255).to(torch.uint8)
    length = int(torch.randint(300, 801, (1,), generator=gen))
    mask = torch.rand(N_FEATURES, generator=gen) > 0.2
    return {
        "record_id": f"{n:08x}-bench", "subject_id": 10000000 + n, "study_id": 50000000 + n,
        "stay_id": 30000000 + n, "hadm_id": None if n % 3 == 0 else 20000000 + n,
        "view_position": "AP" if n % 2 else "PA", "split": split,
        "study_datetime": "2180-07-23T21:30:14.531000", "image": image,
        "image_box": torch.tensor([top, 0, height, size], dtype=torch.int32),
        "enhanced_note": "Chief complaint: dyspnea. " * (length // 6),
        "text_input_ids": torch.randint(1, 30522, (length,), generator=gen, dtype=torch.int32),
        "attention_segments": [["triage", 0, length // 3], ["vitals", length // 3, length // 2],
                               ["retrieved_knowledge", length // 2, length]],
        "clinical_data": torch.randn(N_FEATURES, generator=gen) * mask,
        "clinical_mask": mask,
        "labels": torch.full((14,), float("nan")),
        "retrieved_knowledge": ["Pneumonia: consolidation on chest radiograph."],
    }


def write_output(root: Path, n_chunks: int, size: int) -> None:
    """An output dir of `n_chunks` train chunks of 50 records and its metadata.json."""
    entries = []
    (root / "train").mkdir(parents=True, exist_ok=True)
    for index in range(n_chunks):
        rel = chunk_relpath("train", index, n_chunks)
        recs = [_record(index * RECORDS_PER_CHUNK + k, "train", size)
                for k in range(RECORDS_PER_CHUNK)]
        data = encode_chunk(recs, split="train")
        (root / rel).write_bytes(data)
        entries.append({"path": rel, "split": "train", "index": index,
                        "records": RECORDS_PER_CHUNK, "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    n = n_chunks * RECORDS_PER_CHUNK
    meta = {"format_version": FORMAT_VERSION, "n_train": n, "n_val": 0, "n_test": 0,
            "total_records": n, "image_size": size, "chunks": entries,
            "feature_names": [f"f{k}" for k in range(N_FEATURES)],
            "label_names": [f"l{k}" for k in range(14)]}
    (root / "metadata.json").write_text(json.dumps(meta))


def _peak_rss_mb() -> dict:
    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, largest child
    return {"main_peak_rss_mb": round(hwm / 1024, 1),
            "worker_peak_rss_mb": round(children / 1024, 1)}


def measure(
    out_dir: str,
    workers: int,
    records: int,
    batch_size: int,
    image_dtype: str = "float32",
    options: Optional[dict] = None,
) -> dict:
    """One configuration, in this (fresh) process; `options` go to `ChunkedDataset`.

    Besides wall-clock rates it reports records per CPU-second of the loading processes (the
    workers, or this process with num_workers=0), a figure that other work on the machine
    disturbs less.
    """
    from transforms.chunks import ChunkedDataset, collate_records

    self_cpu = _cpu(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    ds = ChunkedDataset(out_dir, "train", batch_size=batch_size, seed=0,
                        image_dtype=getattr(torch, image_dtype), **(options or {}))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate_records)
    it = iter(loader)
    batch = next(it)
    first = time.perf_counter() - t0
    channels = 1 if image_dtype == "uint8" else 3
    if "image_tensor" in batch:
        assert batch["image_tensor"].shape[1:] == (channels, IMAGE_SIZE, IMAGE_SIZE)
    seen = len(batch["record_id"])
    t1 = time.perf_counter()
    timed = 0
    for batch in it:
        seen += len(batch["record_id"])
        timed += len(batch["record_id"])
        if records and seen >= records:
            break
    elapsed = time.perf_counter() - t1
    del it, loader, batch  # joins the workers, whose CPU time then counts as children's
    if workers:
        cpu = _cpu(resource.RUSAGE_CHILDREN)
    else:
        cpu = _cpu(resource.RUSAGE_SELF) - self_cpu
    rate = timed / elapsed
    return {"workers": workers, "image_dtype": image_dtype, **(options or {}), "records": seen,
            "first_batch_s": round(first, 3),
            "records_per_s": round(rate, 1),
            "records_per_s_per_worker": round(rate / max(workers, 1), 1),
            "records_per_cpu_s": round(seen / cpu, 1),
            "loadavg_1min": round(os.getloadavg()[0], 2), **_peak_rss_mb()}


def write_ceiling(batch_size: int, repeats: int = 10) -> dict:
    """What any DataLoader worker pays to hand over a float32 [3, S, S] image: a fresh
    shared-memory batch buffer written once (as `_batch_buffer` allocates it in a worker),
    against fresh private memory; and `normalize_images` of a uint8 batch here on the CPU."""
    from transforms.chunks import normalize_images

    def per_image(alloc) -> float:
        src = torch.rand(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)
        t = time.perf_counter()
        for _ in range(repeats):
            alloc().copy_(src)
        return round((time.perf_counter() - t) / (repeats * batch_size) * 1000, 3)

    shape = (batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)

    def shared() -> torch.Tensor:
        proto = torch.empty(0)
        storage = proto._typed_storage()._new_shared(math.prod(shape), device="cpu")
        return proto.new(storage).view(shape)

    grey = torch.randint(0, 256, (batch_size, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    t = time.perf_counter()
    for _ in range(repeats):
        normalize_images(grey)
    cpu_norm = (time.perf_counter() - t) / (repeats * batch_size) * 1000
    return {"fresh_shared_memory_write": per_image(shared),
            "fresh_private_memory_write": per_image(lambda: torch.empty(shape)),
            "normalize_images_cpu": round(cpu_norm, 3)}


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _subprocess(
    out_dir: Path | str,
    workers: int,
    records: int,
    batch_size: int,
    image_dtype: str = "float32",
    options: Optional[dict] = None,
) -> dict:
    cmd = [sys.executable, __file__, "--_measure", str(out_dir), "--workers", str(workers),
           "--records", str(records), "--batch_size", str(batch_size),
           "--image_dtype", image_dtype, "--_options", json.dumps(options or {})]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def shuffle_reach(n_chunks: int, batch_size: int, record_mb: float) -> list[dict]:
    """Distinct chunks per batch of the epoch order, for the former default window (2 chunks)
    and the default; and what one window holds (its chunks, and the pages of its records)."""
    from transforms.chunks.dataset import DEFAULT_SHUFFLE_WINDOW, _EpochOrder

    counts = [RECORDS_PER_CHUNK] * n_chunks
    results = []
    for name, window in (("2 chunks (former default)", 2 * RECORDS_PER_CHUNK),
                         (f"{DEFAULT_SHUFFLE_WINDOW} records (default)", DEFAULT_SHUFFLE_WINDOW)):
        chunks = math.ceil(window / RECORDS_PER_CHUNK)
        order = _EpochOrder(counts, 0, 0, True, chunks)
        distinct, largest = [], []
        for lo in range(0, len(order) - batch_size + 1, batch_size):
            per_chunk = collections.Counter(order.locate(p)[0]
                                            for p in range(lo, lo + batch_size))
            distinct.append(len(per_chunk))
            largest.append(max(per_chunk.values()))
        results.append({
            "window": name, "chunks_per_window": min(chunks, n_chunks),
            "distinct_chunks_per_batch_mean": round(sum(distinct) / len(distinct), 1),
            "distinct_chunks_per_batch_min": min(distinct),
            "most_records_from_one_chunk_mean": round(sum(largest) / len(largest), 1),
            "window_mb": round(min(chunks, n_chunks) * RECORDS_PER_CHUNK * record_mb),
        })
    return results


def _emulator() -> tuple[subprocess.Popen, str]:
    """A gcp-storage-emulator on loopback with a bucket; returns it and the bucket's URI."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = Path(sys.executable).with_name("gcp-storage-emulator")
    proc = subprocess.Popen([str(exe), "start", "--host", "127.0.0.1", "--port", str(port),
                             "--in-memory"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    os.environ.setdefault("GOOGLE_CLOUD_PROJECT", "bench-project")
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    storage.Client(credentials=AnonymousCredentials()).create_bucket("bench-bucket")
    return proc, "gs://bench-bucket"


def gcs_prefetch(
    out_dir: Path, batch_size: int, tmp: Path, latency_ms: float, mb_per_s: float
) -> list[dict]:
    """First batch and records/s over a whole epoch from the emulator, uint8 images in the
    training process, each run with an empty download cache; with and without prefetch, over
    loopback and over the shaped link."""
    from tests.gcs_proxy import CountingProxy
    from transforms.chunks.dataset import DEFAULT_PREFETCH, DEFAULT_SHUFFLE_WINDOW

    proc, bucket = _emulator()
    emulator = os.environ["STORAGE_EMULATOR_HOST"]
    shaped = CountingProxy(emulator, latency_ms / 1000, mb_per_s * 1e6)
    try:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(credentials=AnonymousCredentials())
        for path in sorted(out_dir.rglob("*")):
            if path.is_file():
                client.bucket("bench-bucket").blob(
                    f"out/{path.relative_to(out_dir).as_posix()}").upload_from_filename(path)
        results = []
        link = f"{latency_ms:g} ms, {mb_per_s:g} MB/s per stream"
        for name, host in (("loopback", emulator), (link, shaped.url)):
            os.environ["STORAGE_EMULATOR_HOST"] = host  # the measuring processes inherit it
            for window in (2 * RECORDS_PER_CHUNK, DEFAULT_SHUFFLE_WINDOW):
                for prefetch in (0, DEFAULT_PREFETCH):
                    cache = tmp / f"cache-{window}-{prefetch}"
                    options = {"shuffle_window": window, "prefetch": prefetch,
                               "cache_dir": str(cache)}
                    results.append({"link": name, **_subprocess(
                        f"{bucket}/out", 0, 0, batch_size, "uint8", options)})
                    shutil.rmtree(cache, ignore_errors=True)
        return results
    finally:
        os.environ["STORAGE_EMULATOR_HOST"] = emulator
        shaped.close()
        proc.terminate()
        proc.wait(timeout=10)


def hot_path_alternatives(size: int) -> dict:
    """ms per image for the uint8 [S, S] -> normalised float [3, S, S] alternatives."""
    from transforms.chunks.dataset import IMAGENET_MEAN, IMAGENET_STD, _Normalizer

    torch.set_num_threads(1)  # as in a DataLoader worker
    img = torch.randint(0, 256, (size, size), dtype=torch.uint8)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    lut = torch.tensor([[(v / 255 - m) / s for v in range(256)] for m, s in zip(mean, std)])
    normalizer = _Normalizer(mean, std)

    def textbook():
        return torch.stack([(img.float() / 255 - m) / s for m, s in zip(mean, std)])

    def lut_index_select():
        idx = img.int().view(-1)
        out = torch.empty(3, size * size)
        for c in range(3):
            torch.index_select(lut[c], 0, idx, out=out[c])
        return out.view(3, size, size)

    def broadcast_mul_add():
        out = torch.empty(3, size, size)
        scale = torch.tensor([1 / (255 * s) for s in std]).view(3, 1, 1)
        torch.mul(img.unsqueeze(0), scale, out=out)
        return out.add_(torch.tensor([-m / s for m, s in zip(mean, std)]).view(3, 1, 1))

    results = {}
    for name, fn in [("textbook_stack", textbook), ("lut_index_select", lut_index_select),
                     ("broadcast_mul_add", broadcast_mul_add),
                     ("chosen_copy_then_fused_add", lambda: normalizer(img))]:
        fn()
        t = time.perf_counter()
        for _ in range(200):
            fn()
        results[name] = round((time.perf_counter() - t) / 200 * 1e3, 3)
    return results


def chunk_open(out_dir: Path) -> dict:
    """ms to open one chunk and read one record's image: mmap vs read + decode."""
    path = str(out_dir / chunk_relpath("train", 0, 5))
    results = {}
    for name, load in [
        ("mmap", lambda: torch.load(path, weights_only=True, mmap=True)),
        ("read_then_decode", lambda: torch.load(io.BytesIO(Path(path).read_bytes()),
                                                weights_only=True)),
    ]:
        load()
        t = time.perf_counter()
        for _ in range(20):
            chunk = load()
            chunk["image"][7].float().sum()
        results[name] = round((time.perf_counter() - t) / 20 * 1e3, 2)
    with open(path, "rb") as handle:
        t = time.perf_counter()
        hashlib.file_digest(handle, "sha256")
        results["sha256_verify"] = round((time.perf_counter() - t) * 1e3, 2)
    results["chunk_mb"] = round(os.path.getsize(path) / 2**20, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=50, help="chunks of the large output")
    parser.add_argument("--records", type=int, default=1000,
                        help="records per throughput run (0: a whole epoch)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--image_dtype", default="float32")
    parser.add_argument("--gcs_chunks", type=int, default=12,
                        help="chunks of the output served by the GCS emulator")
    parser.add_argument("--gcs_latency_ms", type=float, default=50,
                        help="shaped link: first-byte latency of each GCS response")
    parser.add_argument("--gcs_mb_per_s", type=float, default=100,
                        help="shaped link: bandwidth of each GCS download stream, MB/s")
    parser.add_argument("--sections", default="throughput,epoch,columns,shuffle,gcs",
                        help="which measurements to run, comma-separated")
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    parser.add_argument("--_options", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        print(json.dumps(measure(args._measure, args.workers, args.records, args.batch_size,
                                 args.image_dtype, json.loads(args._options))))
        return
    sections = set(args.sections.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        large, small, remote = tmp / "large", tmp / "small", tmp / "remote"
        t = time.perf_counter()
        write_output(small, 5, IMAGE_SIZE)
        if sections & {"throughput", "epoch", "columns"}:
            write_output(large, args.chunks, IMAGE_SIZE)
        print(f"wrote chunks of {RECORDS_PER_CHUNK} records ({IMAGE_SIZE}x{IMAGE_SIZE}) in "
              f"{time.perf_counter() - t:.0f} s to {tmp}")
        if "throughput" in sections:
            print("hot path, ms per image (1 thread):",
                  json.dumps(hot_path_alternatives(IMAGE_SIZE)))
            print("chunk open, ms:", json.dumps(chunk_open(small)))
            for workers in (0, 1, 2):
                print("throughput:", json.dumps(_subprocess(large, workers, args.records,
                                                            args.batch_size)))
            print("throughput:", json.dumps(_subprocess(large, 1, args.records,
                                                        args.batch_size, "bfloat16")))
            for workers in (1, 2):
                print("throughput:", json.dumps(_subprocess(large, workers, args.records,
                                                            args.batch_size, "uint8")))
            print("ceiling, ms per image:", json.dumps(write_ceiling(args.batch_size)))
        if "epoch" in sections:
            for name, out in (("5 chunks", small), (f"{args.chunks} chunks", large)):
                for workers in (0, 1):
                    res = _subprocess(out, workers, 0, args.batch_size)
                    print(f"whole epoch, {name}:", json.dumps(res))
        if "columns" in sections:
            for columns in (None, ["record_id", "labels"]):
                options = {} if columns is None else {"columns": columns}
                print("columns:", json.dumps(_subprocess(large, 0, args.records,
                                                         args.batch_size, options=options)))
        if "shuffle" in sections:
            record_mb = os.path.getsize(small / chunk_relpath("train", 0, 5)) / 2**20
            for row in shuffle_reach(max(args.chunks, 1000), args.batch_size,
                                     record_mb / RECORDS_PER_CHUNK):
                print("shuffle reach:", json.dumps(row))
        if "gcs" in sections:
            write_output(remote, args.gcs_chunks, IMAGE_SIZE)
            for row in gcs_prefetch(remote, args.batch_size, tmp, args.gcs_latency_ms,
                                    args.gcs_mb_per_s):
                print("gcs emulator:", json.dumps(row))
        print("reproduce: cd", REPO, "&& .venv/bin/python benchmarks/bench_loader.py",
              f"--chunks {args.chunks} --records {args.records} --batch_size {args.batch_size}",
              f"--gcs_chunks {args.gcs_chunks} --gcs_latency_ms {args.gcs_latency_ms:g}",
              f"--gcs_mb_per_s {args.gcs_mb_per_s:g} --sections {args.sections}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
