"""Decode paths for full-size radiograph JPEGs, and the image stage's throughput.

Builds realistic MIMIC-CXR-JPG-sized JPEGs (2544 wide x 3056 high, quality 95, ~1.2 MB) from the
real NIH radiographs bundled in transforms/radiographs (upsampled, re-exposed, fine film grain: see
transforms/synthetic_images.py), then prints, per image on one core:
  - decode time: cv2.imdecode IMREAD_GRAYSCALE, IMREAD_REDUCED_GRAYSCALE_2/_4/_8, Pillow full
    and Pillow with draft() (DCT-domain reduction picked for the target size);
  - how much a reduced decode changes the 518 output (vs. the full decode, both letterboxed);
  - resize (letterbox) and CLAHE times, and preprocess_image end to end;
then how each decode path keeps its speed while another thread runs Python code (the GIL), and
throughput in images/s of read_bytes + preprocess_image over files on disk: a tight loop on 1
thread, 2 threads and 2 processes, and PreprocessImages in a Beam pipeline (FnApiRunner,
2 workers, in threads and in processes).

Usage (the throughput figures need both cores idle):
    .venv/bin/python benchmarks/bench_image_decode.py [--images 4] [--repeats 5]
        [--pipeline_records 400] [--size 518] [--sections all|single|throughput]
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transforms import images, records, storage, synthetic_images  # noqa: E402

HEIGHT, WIDTH = 3056, 2544


def make_jpegs(count: int, seed: int) -> list[bytes]:
    """`count` distinct portrait 2544 x 3056 radiograph-like JPEGs at quality 95."""
    sources = synthetic_images.load_radiographs()
    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        pixels = synthetic_images.synthesize_radiograph(
            sources[index % len(sources)], HEIGHT, WIDTH, rng
        )
        ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert ok
        out.append(buf.tobytes())
    return out


def per_image_ms(
    fn: Callable[[bytes], object], blobs: Sequence[bytes], repeats: int, clock=time.process_time
) -> tuple[float, float]:
    """(median, min) milliseconds per image of fn over all blobs, `repeats` passes.

    The default clock is this process's CPU time, so that other work on a shared machine
    does not inflate single-core figures (OpenCV runs single-threaded here).
    """
    for blob in blobs:  # warm-up
        fn(blob)
    passes = []
    for _ in range(repeats):
        start = clock()
        for blob in blobs:
            fn(blob)
        passes.append((clock() - start) / len(blobs) * 1000)
    return statistics.median(passes), min(passes)


def row(name: str, timing: tuple, note: str = "") -> None:
    print(f"  {name:<44} {timing[0]:7.2f} ms  (min {timing[1]:6.2f}) {note}")


def cv2_decode(flag: int) -> Callable[[bytes], np.ndarray]:
    return lambda blob: cv2.imdecode(np.frombuffer(blob, np.uint8), flag)


def pil_decode(
    target: tuple[int, int] | None, one_call: bool = False
) -> Callable[[bytes], np.ndarray]:
    def decode(blob: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(blob)) as image:
            if one_call:  # what images.py does: the whole file in one decoder call
                image.decodermaxblock = len(blob)
            image.draft("L", target)
            image.load()
            return np.asarray(image)

    return decode


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():
        pass


def calls_per_second(fn: Callable[[bytes], object], blobs: Sequence[bytes], busy: bool) -> float:
    """Wall-clock calls/s of fn for ~2 s, alone or beside a thread that runs Python code."""
    stop = threading.Event()
    spinner = threading.Thread(target=_spin, args=(stop,))
    if busy:
        spinner.start()
    try:
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < 2.0:
            fn(blobs[calls % len(blobs)])
            calls += 1
        return calls / (time.perf_counter() - start)
    finally:
        stop.set()
        if busy:
            spinner.join()


def gil_contention(blobs: Sequence[bytes], size: int) -> None:
    """How each path fares when another thread of the process runs Python (Beam's threads)."""
    box_h, box_w = images._fit(HEIGHT, WIDTH, size)
    paths = {
        "Pillow draft, 64 KB decoder calls (default)": pil_decode((box_w, box_h)),
        "Pillow draft, one decoder call": pil_decode((box_w, box_h), one_call=True),
        "cv2 IMREAD_REDUCED_GRAYSCALE_4": cv2_decode(cv2.IMREAD_REDUCED_GRAYSCALE_4),
        f"preprocess_image(size={size})": lambda b: images.preprocess_image(b, size=size),
    }
    print("\nGIL: calls/s alone -> beside a thread running Python code (2 idle cores needed):")
    for name, fn in paths.items():
        alone = calls_per_second(fn, blobs, busy=False)
        busy = calls_per_second(fn, blobs, busy=True)
        print(f"  {name:<44} {alone:6.1f} -> {busy:6.1f} ({busy / alone:.0%})")


def _work(path: str, size: int) -> int:
    image, _ = images.preprocess_image(storage.read_bytes(path), size=size)
    return image.shape[0]


def _process_init() -> None:
    cv2.setNumThreads(1)


def loop_rate(paths: Sequence[str], size: int, mode: str) -> float:
    """Images/s of read_bytes + preprocess_image over `paths`: '1thread', '2threads', '2procs'."""
    if mode == "1thread":
        _work(paths[0], size)
        start = time.perf_counter()
        for path in paths:
            _work(path, size)
        return len(paths) / (time.perf_counter() - start)
    if mode == "2threads":
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(_work, paths[:4], [size] * 4))
            start = time.perf_counter()
            list(pool.map(_work, paths, [size] * len(paths)))
            return len(paths) / (time.perf_counter() - start)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2, initializer=_process_init) as pool:
        pool.starmap(_work, [(p, size) for p in paths[:4]])
        start = time.perf_counter()
        pool.starmap(_work, [(p, size) for p in paths], chunksize=8)
        return len(paths) / (time.perf_counter() - start)


def _record(index: int, path: str) -> records.CohortRecord:
    return records.CohortRecord(
        record_id=f"bench-{index:06d}", subject_id=10000000 + index, study_id=50000000 + index,
        stay_id=30000000 + index, hadm_id=None, view_position="PA",
        study_datetime="2180-01-01T00:00:00", image_path=path, patient=None, stay={},
        triage=None, vitals=(), medications=(), prior_admissions=0, labels=(float("nan"),) * 14,
    )


def pipeline_rate(paths: Sequence[str], size: int, running_mode: str) -> tuple[float, float]:
    """(records/s over the whole run, seconds) of PreprocessImages on FnApiRunner, 2 workers."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions(
        ["--runner=FnApiRunner", "--direct_num_workers=2",
         f"--direct_running_mode={running_mode}"]
    )
    samples = [records.sample_from(_record(i, p)) for i, p in enumerate(paths)]
    start = time.perf_counter()
    with beam.Pipeline(options=options) as p:
        good, dead = (
            p
            | beam.Create(samples, reshuffle=False)
            | "Spread" >> beam.Reshuffle()  # as after the cohort join: work split over workers
            | images.PreprocessImages(image_size=size)
        )
        _ = (
            good
            | "Sides" >> beam.Map(lambda sample: sample["image"].shape[0])
            | beam.combiners.Count.Globally()
        )
    seconds = time.perf_counter() - start
    return len(paths) / seconds, seconds


def single_core(blobs: Sequence[bytes], size: int, repeats: int) -> None:
    """Per-image CPU times on one core: decode paths, their output, resize, CLAHE, total."""
    box_h, box_w = images._fit(HEIGHT, WIDTH, size)
    print("\nDecode, per image, one core:")
    decoders = {
        "cv2 IMREAD_GRAYSCALE (full)": cv2_decode(cv2.IMREAD_GRAYSCALE),
        "cv2 IMREAD_REDUCED_GRAYSCALE_2": cv2_decode(cv2.IMREAD_REDUCED_GRAYSCALE_2),
        "cv2 IMREAD_REDUCED_GRAYSCALE_4": cv2_decode(cv2.IMREAD_REDUCED_GRAYSCALE_4),
        "cv2 IMREAD_REDUCED_GRAYSCALE_8": cv2_decode(cv2.IMREAD_REDUCED_GRAYSCALE_8),
        "Pillow full": pil_decode(None),
        f"Pillow draft('L', {box_w}x{box_h})": pil_decode((box_w, box_h)),
        "  same, one decoder call (as images.py)": pil_decode((box_w, box_h), one_call=True),
    }
    decoded = {}
    for name, fn in decoders.items():
        timing = per_image_ms(fn, blobs, repeats)
        decoded[name] = fn(blobs[0])
        h, w = decoded[name].shape
        note = f"-> {w}x{h}" + ("  (longer side < size: not usable)" if max(h, w) < size else "")
        row(name, timing, note)

    print(f"\nReduced decode vs full decode, after letterbox to {size} (abs grey-level diff):")
    reference, _ = images.letterbox(decoded["cv2 IMREAD_GRAYSCALE (full)"], size)
    for name in [n for n in decoders if "full" not in n and "same" not in n]:
        pixels = decoded[name]
        if max(pixels.shape) < size:
            continue
        out, _ = images.letterbox(pixels, size, source_shape=(HEIGHT, WIDTH))
        diff = np.abs(out.astype(np.int16) - reference.astype(np.int16))
        print(f"  {name:<44} max {diff.max():3d}  mean {diff.mean():.3f}  "
              f"p99.9 {np.percentile(diff, 99.9):.0f}")

    print(f"\nResize and CLAHE ({size}), per image, one core:")
    full = decoded["cv2 IMREAD_GRAYSCALE (full)"]
    quarter = decoded["cv2 IMREAD_REDUCED_GRAYSCALE_4"]
    row("letterbox from full decode (INTER_AREA)",
        per_image_ms(lambda _: images.letterbox(full, size), blobs, repeats))
    row("letterbox from 1/4 decode (INTER_AREA)",
        per_image_ms(lambda _: images.letterbox(quarter, size), blobs, repeats))
    boxed, box = images.letterbox(quarter, size)
    row("CLAHE clip 2.0, 8x8 tiles, on the box",
        per_image_ms(lambda _: images.enhance_contrast(boxed, box), blobs, repeats))
    both = lambda _: images.enhance_contrast(*images.letterbox(quarter, size))  # noqa: E731
    row("letterbox from 1/4 + CLAHE, cv2 threads=1", per_image_ms(both, blobs, repeats))
    cv2.setNumThreads(-1)  # OpenCV's default thread pool; CPU time would hide its gain
    row(f"  same, cv2 threads={cv2.getNumThreads()}, wall clock",
        per_image_ms(both, blobs, repeats, clock=time.perf_counter))
    cv2.setNumThreads(1)
    row("  same, cv2 threads=1, wall clock",
        per_image_ms(both, blobs, repeats, clock=time.perf_counter))

    print("\npreprocess_image end to end (bytes in memory), per image, one core:")
    for clahe in (True, False):
        timing = per_image_ms(
            lambda b, c=clahe: images.preprocess_image(b, size=size, clahe=c), blobs, repeats
        )
        row(f"preprocess_image(size={size}, clahe={clahe})", timing,
            f"= {1000 / timing[0]:.1f} images/s")


def throughput(blobs: Sequence[bytes], size: int, count: int) -> None:
    """Images/s over `count` files: tight loops, then PreprocessImages in Beam pipelines."""
    with tempfile.TemporaryDirectory(prefix="bench-images-") as tmp:
        paths = []
        for index in range(count):
            path = os.path.join(tmp, f"{index:06d}.jpg")
            Path(path).write_bytes(blobs[index % len(blobs)])  # distinct files, as on disk
            paths.append(path)
        for path in paths:
            storage.read_bytes(path)  # page cache warm
        read = per_image_ms(lambda p: storage.read_bytes(p), paths[:40], 3)
        print(f"\nThroughput over {len(paths)} files (page cache warm; storage.read_bytes "
              f"{read[0]:.2f} ms CPU a file), wall clock:")
        rates = {}
        for mode in ("1thread", "2threads", "2procs"):
            rates[mode] = loop_rate(paths, size, mode)
            print(f"  read_bytes + preprocess_image tight loop, {mode:<9} "
                  f"{rates[mode]:6.1f} images/s")
        small = paths[: max(8, len(paths) // 10)]
        for running_mode in ("multi_threading", "multi_processing"):
            rate, seconds = pipeline_rate(paths, size, running_mode)
            _, small_seconds = pipeline_rate(small, size, running_mode)
            marginal = (len(paths) - len(small)) / max(seconds - small_seconds, 1e-9)
            print(f"  PreprocessImages, FnApiRunner 2 workers, {running_mode}:\n"
                  f"    {rate:6.1f} records/s over the whole run ({seconds:.1f} s incl. start-up),"
                  f" {rate / rates['2procs']:.0%} of the 2-process loop\n"
                  f"    {marginal:6.1f} records/s start-up excluded (runs of {len(paths)} and "
                  f"{len(small)} records), {marginal / rates['2procs']:.0%} of the 2-process loop")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="distinct full-size JPEGs")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per measurement")
    parser.add_argument("--size", type=int, default=518, help="target side")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--pipeline_records", type=int, default=400,
        help="files for the throughput loops and the Beam pipelines",
    )
    parser.add_argument(
        "--sections", choices=("all", "single", "throughput"), default="all",
        help="single-core figures, multi-core throughput (needs idle cores), or both",
    )
    args = parser.parse_args(argv)
    print("Reproduce: " + shlex.join([".venv/bin/python", "benchmarks/bench_image_decode.py",
                                      *(sys.argv[1:] if argv is None else argv)]))
    print(f"cv2 {cv2.__version__}, Pillow {Image.__version__}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs; single-threaded OpenCV (cv2.setNumThreads(1)) unless noted; "
          "per-image times are CPU time of this process")
    cv2.setNumThreads(1)

    blobs = make_jpegs(args.images, args.seed)
    sizes_mb = [len(b) / 1e6 for b in blobs]
    print(f"\n{len(blobs)} JPEGs {WIDTH} wide x {HEIGHT} high, quality 95, "
          f"{min(sizes_mb):.2f}-{max(sizes_mb):.2f} MB")
    if args.sections in ("all", "single"):
        single_core(blobs, args.size, args.repeats)
    if args.sections in ("all", "throughput"):
        gil_contention(blobs, args.size)
        throughput(blobs, args.size, args.pipeline_records)

if __name__ == "__main__":
    main()
