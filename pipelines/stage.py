"""Stage a copy of what the Dataflow job reads from PhysioNet's buckets into the user's bucket.

PhysioNet grants its buckets to the user's own Google account; Dataflow workers run as a
service account PhysioNet does not know, so they cannot read them. This module copies, with the
user's credentials on the launcher, the tables the pipeline reads (`schema.INPUT_TABLES` and the
official split table) and only the JPEGs of the cohort (the pipeline's own rule: a frontal image
whose study moment lies inside an ED stay of its subject, `transforms.join.cohort`) into `stage_to`:

    python -m pipelines.stage --mimic_iv_dir gs://... --mimic_ed_dir gs://... \
        --mimic_cxr_dir gs://... --stage_to gs://BUCKET/physionet-copy \
        --requester_pays_project PROJECT [--views AP,PA] [--dry-run] [--workers 32]

Each object `gs://SRC/NAME` lands at `STAGE_TO/SRC/NAME`, so the staged roots are the source
roots under `stage_to` (`staged_roots`). The copy is a server-side `rewrite` (no bytes pass
through the launcher) billed to `requester_pays_project`, done by a pool of threads with one
client each, and resumable: the destination is listed once and an object whose size and
crc32c already match is skipped. `STAGE_TO/_manifest.json` (each object's name, source, size,
crc32c) is written last, once every copy succeeded. `--dry-run` prints the plan and its cost
without copying.

`./run_dataflow.sh --stage [--dry-run]` calls `run_stage` with the config's values; later runs
of the launcher read the copy (`dataflow_config.reading_staged_copy`). GCS calls go through
`storage.gcs_bucket` (one client per thread and billing project); the prices are
`pipelines.prices`.

The plan's pure part (`linked_image_paths`, `plan_copies`, `estimate`) needs no GCS.
"""

from __future__ import annotations

import argparse
import base64
import collections
import concurrent.futures
import dataclasses
import json
import logging
import math
import sys
import threading
import time
from typing import (
    Any, Callable, Container, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence,
)

from pipelines.prices import PRICES
from transforms import storage
from transforms.errors import InputError
from transforms.join import schema
from transforms.join.cohort import parse_study_datetime, parse_table_datetime, pick_stay
from transforms.join.tables import columns, iter_rows, table_path

MANIFEST_NAME = "_manifest.json"
MANIFEST_VERSION = 1
DEFAULT_WORKERS = 32
DEFAULT_PROGRESS_SECONDS = 30.0

# Assumptions behind the dry run's figures (prices: `pipelines.prices`); printed with them.
ASSUMPTIONS = {
    # One server-side rewrite of a ~1.5 MB JPEG within a location, per thread, including the
    # request's round trip (not measured: no GCS here).
    "seconds_per_object": 0.25,
    # Ceiling on the bytes all threads together get rewritten per second.
    "mb_per_second": 400.0,
    # Objects per list call (the API's page size).
    "objects_per_list_call": 1000,
}

_GB = 1e9


class ObjectInfo(NamedTuple):
    """What a listing says of one object: enough to tell whether a copy is current."""

    size: int
    crc32c: str


@dataclasses.dataclass(frozen=True)
class StageObject:
    """One object to be present in the staged copy."""

    source: str  # gs://SRC/NAME
    dest: str  # STAGE_TO/SRC/NAME
    size: int
    crc32c: str


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Every object of the staged copy, which of them still need copying, and what is absent.

    `objects` are sorted by destination; `to_copy` is the subset whose destination is absent
    or differs in size or crc32c. `missing` are cohort images without a source object (the
    run records them as missing files); a missing table is an error before any plan.
    """

    objects: tuple[StageObject, ...]
    to_copy: tuple[StageObject, ...]
    missing: tuple[str, ...]
    tables: int
    images: int
    listed: int = 0  # objects listed to build the plan (source and destination)

    @property
    def bytes(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def copy_bytes(self) -> int:
        return sum(o.size for o in self.to_copy)


@dataclasses.dataclass(frozen=True)
class StageEstimate:
    """The dry run's figures for a plan (USD; seconds)."""

    operations_usd: float
    storage_usd_month: float
    transfer_usd_if_cross_location: float
    seconds: float


class StageError(RuntimeError):
    """Some copies failed; the message says how many and names the first."""


# ----------------------------------------------------------------------------- paths
def split_gs(uri: str) -> tuple[str, str]:
    """("bucket", "name/under/it") of a gs:// URI (the name may be empty).

    Raises:
        InputError: not a gs:// URI.
    """
    try:
        return storage.split_gcs(uri, prefix=True)
    except ValueError:
        raise InputError(f"staging copies between gs:// locations; got {uri!r}") from None


def staged_uri(source: str, stage_to: str) -> str:
    """Where `source` (gs://SRC/NAME, or a root) lands under `stage_to`: STAGE_TO/SRC/NAME."""
    bucket, name = split_gs(source)
    return "/".join(p for p in (stage_to.rstrip("/"), bucket, name.strip("/")) if p)


def staged_roots(
    roots: Mapping[str, str], stage_to: str, image_root: Optional[str] = None
) -> dict[str, str]:
    """The config values that point the job at the staged copy.

    Args:
        roots: schema.MIMIC_IV / MIMIC_ED / MIMIC_CXR -> source root (gs://).
        stage_to: the staged copy's gs:// folder.
        image_root: the source `cxr_image_root` (None: images under the MIMIC-CXR root).

    Returns:
        mimic_iv_dir, mimic_ed_dir, mimic_cxr_dir and cxr_image_root -> staged gs:// roots.
    """
    staged = {key: staged_uri(roots[key], stage_to)
              for key in (schema.MIMIC_IV, schema.MIMIC_ED, schema.MIMIC_CXR)}
    staged["cxr_image_root"] = staged_uri(image_root or roots[schema.MIMIC_CXR], stage_to)
    return staged


# ----------------------------------------------------------------------------- the cohort
class _Stay(NamedTuple):
    """A stay's bounds: what `pick_stay` compares (EdStay carries the record's fields too)."""

    intime: Any
    outtime: Any
    stay_id: int


def stays_by_subject(rows: Iterable[Optional[tuple]]) -> dict[int, list[_Stay]]:
    """subject_id -> its ED stays' bounds, from edstays rows (`tables.columns("edstays")`).

    A stay whose intime or outtime does not parse is left out, as the join leaves it out.
    """
    cols = columns("edstays")
    subject_at, stay_at = cols.index("subject_id"), cols.index("stay_id")
    in_at, out_at = cols.index("intime"), cols.index("outtime")
    stays: dict[int, list[_Stay]] = collections.defaultdict(list)
    for row in rows:
        if row is None:
            continue
        start, end = parse_table_datetime(row[in_at]), parse_table_datetime(row[out_at])
        if start is not None and end is not None:
            stays[row[subject_at]].append(_Stay(start, end, row[stay_at]))
    return stays


def linked_image_paths(
    rows: Iterable[Optional[tuple]], stays: Mapping[int, Sequence[_Stay]], views: Iterable[str]
) -> Iterator[str]:
    """The image paths (relative to the image root) of the metadata rows that the job reads:
    a frontal view (`views`) whose study moment lies inside an ED stay of its subject. Images
    whose StudyDate/StudyTime does not parse are dead letters before any read, so left out.
    With `--aggressive_filtering` or `--limit` the job reads a subset of these."""
    frontal = frozenset(v.strip().upper() for v in views if v.strip())
    cols = columns("metadata")
    at = [cols.index(c) for c in ("dicom_id", "subject_id", "study_id", "ViewPosition",
                                  "StudyDate", "StudyTime")]
    for row in rows:
        if row is None:
            continue
        dicom_id, subject_id, study_id, view, date, clock = (row[i] for i in at)
        if (view or "").strip().upper() not in frontal:
            continue
        try:
            when = parse_study_datetime(date, clock)
        except ValueError:
            continue
        if pick_stay(when, stays.get(subject_id, ())) is not None:
            yield schema.image_relpath(subject_id, study_id, dicom_id)


def cohort_image_paths(
    roots: Mapping[str, str], views: Iterable[str], user_project: Optional[str]
) -> list[str]:
    """The sorted image paths (relative to the image root) the job reads, from the tables.

    Streams edstays (keeping each subject's stay bounds) and then the metadata table.
    """
    edstays = schema.TABLES["edstays"]
    stays = stays_by_subject(iter_rows(edstays, table_path(edstays, roots), user_project))
    metadata = schema.TABLES["metadata"]
    rows = iter_rows(metadata, table_path(metadata, roots), user_project)
    return sorted(set(linked_image_paths(rows, stays, views)))


# ----------------------------------------------------------------------------- the plan
def plan_copies(
    wanted: Iterable[tuple[str, str]],
    sources: Mapping[str, ObjectInfo],
    existing: Mapping[str, ObjectInfo],
    *,
    tables: int = 0,
    listed: int = 0,
) -> StagePlan:
    """Which objects the staged copy holds and which still need copying.

    Args:
        wanted: (source URI, destination URI) of every object the job reads; the first
            `tables` of them are tables.
        sources: source URI -> its listing (a wanted object absent here is missing).
        existing: destination URI -> its listing.
        tables: how many of `wanted` are tables (all present: see `make_plan`).
        listed: objects listed to build the maps (for the operations cost).
    """
    objects, to_copy, missing = [], [], []
    for source, dest in wanted:
        info = sources.get(source)
        if info is None:
            missing.append(source)
            continue
        item = StageObject(source, dest, info.size, info.crc32c)
        objects.append(item)
        if existing.get(dest) != info:
            to_copy.append(item)
    objects.sort(key=lambda o: o.dest)
    to_copy.sort(key=lambda o: o.dest)
    return StagePlan(
        objects=tuple(objects), to_copy=tuple(to_copy), missing=tuple(sorted(missing)),
        tables=tables, images=len(objects) - tables, listed=listed,
    )


def estimate(plan: StagePlan, workers: int = DEFAULT_WORKERS) -> StageEstimate:
    """Cost and time of carrying out `plan` at PRICES, under ASSUMPTIONS."""
    list_calls = math.ceil(plan.listed / ASSUMPTIONS["objects_per_list_call"])
    operations = (len(plan.to_copy) + list_calls + 1) * PRICES["gcs_class_a_per_1000"] / 1000
    by_objects = len(plan.to_copy) * ASSUMPTIONS["seconds_per_object"] / max(workers, 1)
    by_bytes = plan.copy_bytes / (ASSUMPTIONS["mb_per_second"] * 1e6)
    return StageEstimate(
        operations_usd=operations,
        storage_usd_month=plan.bytes / _GB * PRICES["gcs_storage_gb_month"],
        transfer_usd_if_cross_location=plan.copy_bytes / _GB
        * PRICES["gcs_transfer_gb_cross_location"],
        seconds=max(by_objects, by_bytes),
    )


def plan_text(plan: StagePlan, est: StageEstimate, stage_to: str, workers: int) -> str:
    """The dry run's report: counts, bytes, cost, time, and the assumptions behind them."""
    staged = len(plan.objects) - len(plan.to_copy)
    lines = [
        f"stage plan for {stage_to}:",
        f"  objects: {len(plan.objects):,} ({plan.tables} tables, {plan.images:,} cohort "
        f"images), {plan.bytes / _GB:,.2f} GB",
        f"  already staged (size and crc32c match): {staged:,}; to copy: "
        f"{len(plan.to_copy):,} objects, {plan.copy_bytes / _GB:,.2f} GB",
    ]
    if plan.missing:
        lines.append(f"  cohort images absent from the source: {len(plan.missing):,} "
                     "(the job records them as missing files)")
    lines += [
        f"  operations: ${est.operations_usd:,.2f} ({len(plan.to_copy):,} rewrites and the "
        f"list calls, Class A at ${PRICES['gcs_class_a_per_1000']}/1,000)",
        f"  storage: ${est.storage_usd_month:,.2f}/month (Standard, regional bucket at "
        f"${PRICES['gcs_storage_gb_month']}/GB-month)",
        f"  transfer: $0 with both buckets in one location; "
        f"${est.transfer_usd_if_cross_location:,.2f} if they are not "
        f"(${PRICES['gcs_transfer_gb_cross_location']}/GB within a continent)",
        f"  time: ~{_duration(est.seconds)} with {workers} threads (assumed "
        f"{ASSUMPTIONS['seconds_per_object']} s per rewrite per thread, at most "
        f"{ASSUMPTIONS['mb_per_second']:.0f} MB/s in all)",
        f"  list prices as of {PRICES['as_of']}; check them before relying on the figures",
    ]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ----------------------------------------------------------------------------- GCS
def _info(blob) -> ObjectInfo:
    return ObjectInfo(int(blob.size), blob.crc32c)


def list_objects(
    prefix_uri: str, user_project: Optional[str], keep: Optional[Container[str]] = None
) -> tuple[dict[str, ObjectInfo], int]:
    """The objects under `prefix_uri` (one paged list): gs:// URI -> listing of those in
    `keep` (all when None), and how many were listed."""
    bucket, prefix = split_gs(prefix_uri)
    found, listed = {}, 0
    try:
        for blob in storage.gcs_list(bucket, prefix, user_project=user_project):
            listed += 1
            uri = f"gs://{bucket}/{blob.name}"
            if keep is None or uri in keep:
                found[uri] = _info(blob)
    except storage.gcs_call_errors() as err:
        raise InputError(f"cannot list {prefix_uri}: {storage.error_line(err)}") from err
    return found, listed



def make_plan(
    roots: Mapping[str, str],
    stage_to: str,
    user_project: Optional[str],
    *,
    image_root: Optional[str] = None,
    views: Iterable[str] = ("AP", "PA"),
    workers: int = DEFAULT_WORKERS,
) -> StagePlan:
    """Reads the join's two tables and lists the sources and the destination (all billed to
    `user_project`), then plans the copy.

    Raises:
        InputError: a root or `stage_to` is not gs://, or a table the job reads is absent.
    """
    split_gs(stage_to)
    image_root = (image_root or roots[schema.MIMIC_CXR]).rstrip("/")
    split_gs(image_root)
    # The official split table too (a few MB): the staged copy serves either --split.
    tables = [table_path(schema.TABLES[name], roots) for name in (*schema.INPUT_TABLES, "split")]
    images = [f"{image_root}/{relpath}" for relpath in
              cohort_image_paths(roots, views, user_project)]
    # Listing beats one metadata call per image (a list call returns 1,000 objects): the
    # images are listed by their top folders (files/p10/ ... files/p19/ in MIMIC) in parallel,
    # with the destination and the tables' metadata.
    folders = sorted({uri.rsplit("/", 3)[0] + "/" for uri in images})
    wanted_images = frozenset(images)
    sources: dict[str, ObjectInfo] = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, min(workers, len(folders) + 2))) as pool:
        existing_future = pool.submit(list_objects, stage_to.rstrip("/") + "/", user_project)
        listings = pool.map(lambda f: list_objects(f, user_project, wanted_images), folders)
        table_infos = list(pool.map(lambda uri: _object_info(uri, user_project), tables))
        listed = 0
        for found, count in listings:
            sources.update(found)
            listed += count
        existing, count = existing_future.result()
        listed += count
    absent = [uri for uri, info in zip(tables, table_infos) if info is None]
    if absent:
        raise InputError(f"tables the job reads are absent: {', '.join(absent)}")
    sources.update(zip(tables, table_infos))
    wanted = [(uri, staged_uri(uri, stage_to)) for uri in tables + images]
    return plan_copies(wanted, sources, existing, tables=len(tables), listed=listed)


def _object_info(uri: str, user_project: Optional[str]) -> Optional[ObjectInfo]:
    bucket, name = split_gs(uri)
    try:
        handle = storage.gcs_bucket(bucket, user_project)
        blob = storage.retried("read", lambda: handle.get_blob(name, retry=None))
    except storage.gcs_call_errors() as err:
        raise InputError(f"cannot read {uri}: {storage.error_line(err)}") from err
    return None if blob is None else _info(blob)



# ----------------------------------------------------------------------------- the copy
@dataclasses.dataclass
class _Progress:
    """Counts shared by the copy threads, and the line the launcher logs now and then."""

    total: int
    total_bytes: int
    done: int = 0
    done_bytes: int = 0
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    started: float = dataclasses.field(default_factory=time.monotonic)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def add(self, item: StageObject, error: Optional[str] = None) -> None:
        with self.lock:
            self.done += 1
            if error is None:
                self.done_bytes += item.size
            else:
                self.failed.append((item.source, error))

    def line(self) -> str:
        with self.lock:
            done, done_bytes, failed = self.done, self.done_bytes, len(self.failed)
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = done_bytes / elapsed
        left = (self.total_bytes - done_bytes) / rate if rate else float("nan")
        text = (f"staged {done:,}/{self.total:,} objects, {done_bytes / _GB:,.2f}/"
                f"{self.total_bytes / _GB:,.2f} GB, {rate / 1e6:,.1f} MB/s")
        if failed:
            text += f", {failed:,} failed"
        return text + (f", ~{_duration(left)} left" if done < self.total and rate else "")


def rewrite_object(item: StageObject, user_project: Optional[str]) -> None:
    """Copies one object server-side, looping on the rewrite token (large objects, or a
    change of location or storage class, take several calls), and checks the copy's crc32c.

    Raises:
        google.api_core.exceptions.GoogleAPICallError: the copy was refused or failed.
        StageError: the copy's crc32c is not the listed one (the source changed).
    """
    source_bucket, source_name = split_gs(item.source)
    dest_bucket, dest_name = split_gs(item.dest)
    source = storage.gcs_bucket(source_bucket, user_project).blob(source_name)
    # The destination's handle carries userProject: a rewrite request is billed to it.
    dest = storage.gcs_bucket(dest_bucket, user_project).blob(dest_name)
    token = None
    while True:
        # Rewriting the same source into the same name is idempotent, so transient errors
        # are retried (the client retries a rewrite only with a generation precondition).
        token, _, _ = storage.retried(
            "copy", lambda token=token: dest.rewrite(source, token=token, retry=None))
        if token is None:
            break
    if dest.crc32c != item.crc32c:
        raise StageError(f"the copy of {item.source} has crc32c {dest.crc32c}, the listing "
                         f"said {item.crc32c}")


def copy_objects(
    items: Sequence[StageObject],
    user_project: Optional[str],
    *,
    workers: int = DEFAULT_WORKERS,
    progress_seconds: float = DEFAULT_PROGRESS_SECONDS,
    copy: Callable[[StageObject, Optional[str]], None] = rewrite_object,
) -> _Progress:
    """Copies `items` with `workers` threads, logging progress every `progress_seconds`
    (counts and bytes only: object names hold patient ids). A failed copy is counted and the
    others go on; the caller decides (see `run_stage`)."""
    progress = _Progress(len(items), sum(i.size for i in items))
    pending = iter(items)
    take = threading.Lock()
    errors = storage.gcs_call_errors() + (StageError,)

    def work() -> None:
        while True:
            with take:
                item = next(pending, None)
            if item is None:
                return
            try:
                copy(item, user_project)
            except errors as err:
                progress.add(item, storage.error_line(err))
            else:
                progress.add(item)

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(work) for _ in range(max(1, min(workers, len(items))))]
        while True:
            done, _ = concurrent.futures.wait(futures, timeout=progress_seconds)
            if len(done) == len(futures):
                break
            logging.info(progress.line())
        for future in futures:
            future.result()  # a programming error in a thread surfaces here
    if items:
        logging.info(progress.line())
    return progress


# ----------------------------------------------------------------------------- the manifest
def manifest_bytes(
    plan: StagePlan,
    roots: Mapping[str, str],
    stage_to: str,
    image_root: Optional[str],
    views: Iterable[str],
) -> bytes:
    """The manifest: what was staged from where, each object's name (under `stage_to`),
    source, size and crc32c; sorted, with no time stamp, so one plan gives the same bytes."""
    prefix = stage_to.rstrip("/") + "/"
    doc = {
        "manifest_version": MANIFEST_VERSION,
        "source_roots": {**{k: roots[k] for k in (schema.MIMIC_IV, schema.MIMIC_ED,
                                                 schema.MIMIC_CXR)},
                         "cxr_image_root": image_root or roots[schema.MIMIC_CXR]},
        "staged_roots": staged_roots(roots, stage_to, image_root),
        "views": sorted({v.strip().upper() for v in views if v.strip()}),
        "tables": plan.tables,
        "images": plan.images,
        "bytes": plan.bytes,
        "objects": [
            {"name": o.dest[len(prefix):], "source": o.source, "size": o.size,
             "crc32c": o.crc32c}
            for o in plan.objects
        ],
    }
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def crc32c_base64(data: bytes) -> str:
    """The crc32c of `data` as GCS reports it (base64 of the big-endian checksum)."""
    import google_crc32c

    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode("ascii")


def write_manifest(data: bytes, stage_to: str, user_project: Optional[str]) -> bool:
    """Uploads the manifest to STAGE_TO/_manifest.json unless an identical one is there.

    Returns:
        Whether it was written.
    """
    bucket, prefix = split_gs(stage_to.rstrip("/") + "/" + MANIFEST_NAME)
    handle = storage.gcs_bucket(bucket, user_project)
    blob = storage.retried("read", lambda: handle.get_blob(prefix, retry=None))
    if blob is not None and _info(blob) == ObjectInfo(len(data), crc32c_base64(data)):
        return False
    storage.retried("upload", lambda: handle.blob(prefix).upload_from_string(
        data, content_type="application/json", retry=None))
    return True


# ----------------------------------------------------------------------------- entry points
@dataclasses.dataclass(frozen=True)
class StageReport:
    """What a stage run did."""

    plan: StagePlan
    estimate: StageEstimate
    copied: int
    copied_bytes: int
    manifest_written: bool
    staged_roots: dict[str, str]


def run_stage(
    roots: Mapping[str, str],
    stage_to: str,
    user_project: str,
    *,
    image_root: Optional[str] = None,
    views: Iterable[str] = ("AP", "PA"),
    dry_run: bool = False,
    workers: int = DEFAULT_WORKERS,
    progress_seconds: float = DEFAULT_PROGRESS_SECONDS,
    out: Callable[[str], None] = print,
) -> StageReport:
    """Plans the staged copy, prints the plan, and (unless `dry_run`) copies what is missing
    or differs and writes the manifest last.

    Args:
        roots: schema.MIMIC_IV / MIMIC_ED / MIMIC_CXR -> source gs:// root.
        stage_to: the gs:// folder of the copy (in the user's bucket).
        user_project: the project billed for every call (PhysioNet's buckets are
            requester-pays).
        image_root: the source `cxr_image_root` (None: under the MIMIC-CXR root).
        views: the frontal ViewPositions (the pipeline's `--views`).
        dry_run: only plan and print.
        workers: copy threads (one client each).
        progress_seconds: how often progress is logged.
        out: where the plan and the result lines go.

    Raises:
        InputError: bad arguments, or a table the job reads is absent.
        StageError: some copies failed (the others are kept; a re-run copies the rest).
    """
    views = tuple(v.strip().upper() for v in views if v.strip())
    if not views:
        raise InputError("--views must name at least one ViewPosition")
    if not user_project:
        raise InputError("staging from PhysioNet's requester-pays buckets needs "
                         "--requester_pays_project (the project billed)")
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    plan = make_plan(roots, stage_to, user_project, image_root=image_root, views=views,
                     workers=workers)
    est = estimate(plan, workers)
    out(plan_text(plan, est, stage_to, workers))
    staged = staged_roots(roots, stage_to, image_root)
    if dry_run:
        return StageReport(plan, est, 0, 0, False, staged)
    progress = copy_objects(plan.to_copy, user_project, workers=workers,
                            progress_seconds=progress_seconds)
    if progress.failed:
        source, error = progress.failed[0]
        raise StageError(
            f"{len(progress.failed):,} of {len(plan.to_copy):,} copies failed (first: {source}: "
            f"{error}); the {progress.done - len(progress.failed):,} done are kept, re-run to "
            "copy the rest")
    try:
        written = write_manifest(manifest_bytes(plan, roots, stage_to, image_root, views),
                                 stage_to, user_project)
    except storage.gcs_call_errors() as err:
        raise StageError(f"every object is staged, but the manifest could not be written: "
                         f"{storage.error_line(err)}; re-run to write it") from err
    out(f"staged {len(plan.objects):,} objects in {stage_to} ({len(plan.to_copy):,} copied, "
        f"{plan.copy_bytes / _GB:,.2f} GB); manifest {stage_to.rstrip('/')}/{MANIFEST_NAME}"
        + ("" if written else " (unchanged)"))
    out("the job reads the staged copy with:\n" + "\n".join(
        f"  {key}: {value}" for key, value in staged.items()))
    retries = storage.retry_summary()
    if retries:
        logging.info(retries)
    return StageReport(plan, est, len(plan.to_copy), plan.copy_bytes, written, staged)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.stage", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--mimic_iv_dir", required=True, help="MIMIC-IV source root (gs://).")
    parser.add_argument("--mimic_ed_dir", required=True, help="MIMIC-IV-ED source root (gs://).")
    parser.add_argument("--mimic_cxr_dir", required=True,
                        help="MIMIC-CXR-JPG source root (gs://).")
    parser.add_argument("--cxr_image_root", default=None,
                        help="Source of the JPEGs, if not under --mimic_cxr_dir.")
    parser.add_argument("--stage_to", required=True,
                        help="gs:// folder in your bucket that receives the copy.")
    parser.add_argument("--requester_pays_project", required=True,
                        help="Project billed for every call (PhysioNet's buckets are "
                        "requester-pays).")
    parser.add_argument("--views", default="AP,PA",
                        help="Comma-separated frontal ViewPositions (the pipeline's --views).")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="Print the plan (objects, bytes, cost, time) and copy nothing.")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help="Copy threads.")
    parser.add_argument("--progress_seconds", type=float, default=DEFAULT_PROGRESS_SECONDS,
                        help="Seconds between progress lines.")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit status (2: bad input, 1: failed copies)."""
    args = _parse_args(argv)
    roots = {schema.MIMIC_IV: args.mimic_iv_dir, schema.MIMIC_ED: args.mimic_ed_dir,
             schema.MIMIC_CXR: args.mimic_cxr_dir}
    try:
        run_stage(roots, args.stage_to, args.requester_pays_project,
                  image_root=args.cxr_image_root, views=args.views.split(","),
                  dry_run=args.dry_run, workers=args.workers,
                  progress_seconds=args.progress_seconds)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.exit(main())
