"""The output's manifest and its commit: failed/, stratification_indices.json, metadata.json.

`WriteMetadata` runs once every chunk is written (it waits on the list of all `ChunkInfo`s)
and publishes, in order: the dead letters under `failed/`, `stratification_indices.json`, the
dataset report (`report.html` and `report/`, see `transforms.write.report`; a failure there is
recorded, not fatal), `DATASET_CARD.md` (`transforms.write.dataset_card`), and `metadata.json` last,
whose presence marks the output complete. It then removes the run's temporary files.
Every input it reads is small (chunk entries, counts, refs; the report's example records, when
asked for, are read back from the written chunks); the manifest is a pure function of them
(sorted keys, no timestamps), so it is byte-identical across runs.

`check_output_dir` runs before the pipeline: it refuses to replace a complete output without
--overwrite and clears what a crashed or replaced run left.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import apache_beam as beam

from transforms.write import dataset_card, report

from transforms.join import schema

from transforms import storage
from transforms import ledger as ledger_names
from transforms.ledger import DEFAULT_MAX_FAILED_FRACTION, ConservationError, check_conservation
from transforms.chunks.format import FORMAT_VERSION
from transforms.chunks.record import SUMMARISED, Summary
from transforms.errors import InputError
from transforms.write.provenance import add_tallies, collect, package_versions, with_images
from transforms.records import DROP_REASONS, FAIL_REASONS, DeadLetter
from transforms.write.groups import RecordRef
from transforms.write.resume import TMP_DIR, prepare_tmp, tmp_dir
from transforms.write.write_chunks import ChunkInfo, PlacedChunk, place_chunks
from transforms.splits import (
    INDICES_NAME,
    SPLITS,
    STRATIFICATION_KEYS,
    SplitAssignment,
    indices_bytes,
)

METADATA_NAME = "metadata.json"
FAILED_DIR = "failed"
FAILED_NAME = "failed-00000-of-00001.jsonl"
LABEL_CLASSES: tuple[str, ...] = ("positive", "negative", "uncertain", "missing")
_LABEL_VALUES = {1.0: "positive", 0.0: "negative", -1.0: "uncertain"}
# What a run writes under the output dir, and so what a new run may clear. The indices file
# is left: it may be the --stratification_indices being reused, and is replaced at commit.
# _tmp/ is kept for a resumed run (`resume.prepare_tmp` decides).
_RUN_DIRS: tuple[str, ...] = (*SPLITS, FAILED_DIR, report.REPORT_DIR)
# At most this many bins in the note-length histogram, whatever the data: memory stays bounded
# and notes of a few hundred tokens still get a fine histogram under the default 8192 limit.
NOTE_TOKEN_BINS = 1024

_LOG = logging.getLogger(__name__)


def check_output_dir(output_dir: str, overwrite: bool, fingerprint: Optional[str] = None
                     ) -> None:
    """Makes `output_dir` ready for a run, before any work.

    A complete output (metadata.json present) stops the run unless `overwrite`; with it, or
    for an incomplete output (what a crashed run left), metadata.json goes first (so a crash
    while clearing leaves an output that reads as incomplete), then train/, val/, test/,
    failed/, report/, report.html (so no example record of an earlier run is left) and
    DATASET_CARD.md. `_tmp/` is kept when it holds the groups of an interrupted run with the
    same `fingerprint` (`transforms.write.resume`), and cleared otherwise (always with
    `overwrite`, or without a fingerprint).
    Other files in the directory are not touched.

    Raises:
        InputError: a complete output is there and `overwrite` is False.
    """
    metadata = storage.join(output_dir, METADATA_NAME)
    if storage.exists(metadata):
        if not overwrite:
            raise InputError(
                f"{output_dir} already holds a complete output ({METADATA_NAME} is there); "
                "pass --overwrite to replace it"
            )
        _LOG.info("Replacing the complete output in %s (--overwrite)", output_dir)
        storage.delete([metadata])
    for name in _RUN_DIRS:
        storage.delete_tree(storage.join(output_dir, name))
    storage.delete([storage.join(output_dir, report.REPORT_NAME),
                   storage.join(output_dir, dataset_card.CARD_NAME)])
    if fingerprint is None:
        storage.delete_tree(tmp_dir(output_dir))
    else:
        prepare_tmp(output_dir, fingerprint, overwrite)


def _label_class(value: float) -> str:
    if math.isnan(value):
        return "missing"
    return _LABEL_VALUES.get(value, "other")


def note_bin_width(max_text_length: int, bins: int = NOTE_TOKEN_BINS) -> int:
    """Tokens per bin of the note-length histogram: at most `bins` bins up to the limit."""
    if max_text_length < 1:
        raise ValueError(f"max_text_length must be >= 1, got {max_text_length}")
    return max(1, math.ceil(max_text_length / bins))


def _extreme(pick, a: Optional[int], b: Optional[int]) -> Optional[int]:
    return b if a is None else a if b is None else pick(a, b)


class _ClassCounts:
    """Summary kind "classes": per position (`names`), records by class of value (1.0
    positive, 0.0 negative, -1.0 uncertain, NaN missing, else other)."""

    def __init__(self, summary: Summary, names: Sequence[str], limit: int) -> None:
        self._key, self._names = summary.key, list(names)

    def new(self) -> list[collections.Counter]:
        return [collections.Counter() for _ in self._names]

    def add(self, acc: list, fact: Sequence[float], record_id: str) -> None:
        if len(fact) != len(self._names):
            raise ValueError(f"record {record_id} has {len(fact)} {self._key}, not "
                             f"{len(self._names)}")
        for counter, value in zip(acc, fact):
            counter[_label_class(value)] += 1

    def merge(self, acc: list, other: list) -> None:
        for counter, counts in zip(acc, other):
            counter.update(counts)

    def summary(self, acc: list, records: int) -> dict:
        out = {}
        for name, counts in zip(self._names, acc):
            out[name] = {cls: counts.get(cls, 0) for cls in LABEL_CLASSES}
            if counts.get("other"):
                out[name]["other"] = counts["other"]
        return out


class _LengthHistogram:
    """Summary kind "length": a histogram of lengths in at most NOTE_TOKEN_BINS fixed bins up
    to the configured limit (lengths beyond it count at it), with min, max, mean and how many
    reached the limit."""

    def __init__(self, summary: Summary, names: Sequence[str], limit: int) -> None:
        self._limit = int(limit)
        self._bin_width = note_bin_width(self._limit)

    def new(self) -> dict:
        return {"bins": collections.Counter(), "sum": 0, "at_limit": 0, "min": None,
                "max": None}

    def add(self, acc: dict, fact: int, record_id: str) -> None:
        acc["bins"][min(fact, self._limit) // self._bin_width] += 1
        acc["sum"] += fact
        acc["at_limit"] += fact >= self._limit
        acc["min"] = _extreme(min, acc["min"], fact)
        acc["max"] = _extreme(max, acc["max"], fact)

    def merge(self, acc: dict, other: dict) -> None:
        acc["bins"].update(other["bins"])
        acc["sum"] += other["sum"]
        acc["at_limit"] += other["at_limit"]
        acc["min"] = _extreme(min, acc["min"], other["min"])
        acc["max"] = _extreme(max, acc["max"], other["max"])

    def summary(self, acc: dict, records: int) -> dict:
        width = self._bin_width
        return {
            # Records per bin, by the bin's first length (a string key, JSON's only kind):
            # start <= length < start + bin_width. Empty bins are left out.
            "bin_width": width,
            "counts": {str(i * width): n for i, n in sorted(acc["bins"].items())},
            "at_max_text_length": acc["at_limit"],
            "min": acc["min"],
            "max": acc["max"],
            "mean": round(acc["sum"] / records, 2) if records else None,
        }


class _MissingShares:
    """Summary kind "missing": per position (`names`), the share of the split's records
    where the mask marks it missing (the fact: the missing positions)."""

    def __init__(self, summary: Summary, names: Sequence[str], limit: int) -> None:
        self._names = list(names)

    def new(self) -> collections.Counter:
        return collections.Counter()  # position -> records missing it

    def add(self, acc: collections.Counter, fact: Sequence[int], record_id: str) -> None:
        if any(not 0 <= i < len(self._names) for i in fact):
            raise ValueError(f"record {record_id} has missing-feature indices {fact} beyond "
                             f"the {len(self._names)}")
        acc.update(fact)

    def merge(self, acc: collections.Counter, other: collections.Counter) -> None:
        acc.update(other)

    def summary(self, acc: collections.Counter, records: int) -> dict:
        return {name: round(acc[i] / records, 6) if records else 0.0
                for i, name in enumerate(self._names)}


# The statistics of each summary kind (`record.SUMMARY_KINDS`).
_SUMMARY_STATS = {"classes": _ClassCounts, "length": _LengthHistogram,
                  "missing": _MissingShares}


class _SplitStatsFn(beam.CombineFn):
    """Per split: records, patients, records per stratum and per key, and each summarised
    record field's statistics (`record.SUMMARISED`: label classes, a fixed-bin histogram of
    note tokens, per feature the records missing it), from the facts on the `RecordRef`s.

    Args:
        feature_names: names of clinical_data's columns (`RecordRef.clinical_missing` indexes
            them).
        max_text_length: the run's --max_text_length (sets the histogram's bins).
        label_names: names of the labels.
    """

    def __init__(self, feature_names: Sequence[str], max_text_length: int,
                 label_names: Sequence[str] = schema.CHEXPERT_LABELS) -> None:
        names = {"feature_names": list(feature_names), "label_names": list(label_names)}
        limits = {"max_text_length": int(max_text_length)}
        self._stats = {
            f.summary.key: _SUMMARY_STATS[f.summary.kind](
                f.summary, names.get(f.summary.names, ()), limits.get(f.summary.limit, 0))
            for f in SUMMARISED
        }

    def create_accumulator(self) -> dict[str, dict[str, Any]]:
        return {}

    def _tally(self, acc: dict, split: str) -> dict:
        if split not in acc:
            acc[split] = {"records": 0, "patients": set(), "strata": collections.Counter(),
                          "fields": {key: stat.new() for key, stat in self._stats.items()}}
        return acc[split]

    def add_input(self, acc: dict, element: tuple[str, RecordRef]) -> dict:
        split, ref = element
        tally = self._tally(acc, split)
        tally["records"] += 1
        tally["patients"].add(ref.subject_id)
        tally["strata"][ref.stratum] += 1
        for key, stat in self._stats.items():
            stat.add(tally["fields"][key], getattr(ref, key), ref.record_id)
        return acc

    def merge_accumulators(self, accumulators: Iterable[dict]) -> dict:
        merged: dict = {}
        for acc in accumulators:
            for split, other in acc.items():
                tally = self._tally(merged, split)
                tally["records"] += other["records"]
                tally["patients"] |= other["patients"]
                tally["strata"].update(other["strata"])
                for key, stat in self._stats.items():
                    stat.merge(tally["fields"][key], other["fields"][key])
        return merged

    def extract_output(self, acc: dict) -> dict[str, dict]:
        return {split: self._summary(acc.get(split) or self._tally({}, split))
                for split in SPLITS}

    def _summary(self, tally: dict) -> dict:
        """The metadata.json entry of one split from its tally."""
        keys: dict[str, collections.Counter] = {key: collections.Counter() for key in
                                                STRATIFICATION_KEYS}
        for stratum, n in tally["strata"].items():
            for key, value in zip(STRATIFICATION_KEYS, stratum.split("|")):
                keys[key][value] += n
        records = tally["records"]
        return {
            "records": records,
            "patients": len(tally["patients"]),
            "strata": dict(sorted(tally["strata"].items())),
            "stratification_keys": {k: dict(sorted(c.items())) for k, c in keys.items()},
            **{key: stat.summary(tally["fields"][key], records)
               for key, stat in self._stats.items()},
        }


def versions() -> dict[str, str]:
    """The versions that shape the bytes of the output (see `transforms.write.provenance`)."""
    return package_versions()


def _reason_counts(known: Sequence[str], counts: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Counts by reason, the known reasons listed even at zero."""
    result = dict.fromkeys(known, 0)
    for reason, n in counts:
        result[reason] = result.get(reason, 0) + int(n)
    return dict(sorted(result.items()))


def check_chunks(chunks: Sequence[ChunkInfo], stats: Mapping[str, dict]) -> None:
    """Checks the chunk list is whole before it is published.

    Raises:
        ValueError: a chunk of an unknown split, a split's chunk indices are not 0..n-1, or
            its chunks do not hold the records its refs counted.
    """
    unknown = sorted({c.split for c in chunks} - set(SPLITS))
    if unknown:
        raise ValueError(f"chunks of unknown splits {unknown}")
    for split in SPLITS:
        mine = sorted((c for c in chunks if c.split == split), key=lambda c: c.index)
        if [c.index for c in mine] != list(range(len(mine))):
            raise ValueError(f"the {split} chunks are not 0..{len(mine) - 1}")
        held = sum(c.records for c in mine)
        if held != stats[split]["records"]:
            raise ValueError(f"the {split} chunks hold {held} records, not "
                             f"{stats[split]['records']}")


def build_metadata(
    *,
    chunks: Sequence[ChunkInfo],
    stats: Mapping[str, dict],
    failed: Iterable[tuple[str, int]],
    dropped: Iterable[tuple[str, int]],
    assignment: SplitAssignment,
    config: Mapping[str, Any],
    image_size: int,
    feature_names: Sequence[str],
    label_names: Sequence[str] = schema.CHEXPERT_LABELS,
    provenance: Optional[Mapping[str, Any]] = None,
) -> dict:
    """The metadata.json document: a function of its arguments and the installed versions.

    Args:
        chunks: every written chunk.
        stats: `_SplitStatsFn` output: per split records, patients, strata, labels, note
            tokens and clinical missingness.
        failed: (reason, count) of the dead letters.
        dropped: (reason, count) of the images that are not records.
        assignment: the split of every cohort patient.
        config: the run's configuration (JSON-serialisable).
        image_size: side of the stored square images.
        feature_names: names of clinical_data's columns.
        label_names: names of the 14 labels.
        provenance: `transforms.write.provenance.collect()`, made once on the launcher (None: the
            versions installed here, no provenance).
    """
    check_chunks(chunks, stats)
    ordered = sorted(chunks, key=lambda c: (SPLITS.index(c.split), c.index))
    patients = collections.Counter(assignment.splits.values())
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        **{f"n_{split}": stats[split]["records"] for split in SPLITS},
        "total_records": sum(stats[split]["records"] for split in SPLITS),
        "image_size": int(image_size),
        "feature_names": list(feature_names),
        "label_names": list(label_names),
        "chunks": [dataclasses.asdict(c) for c in ordered],
        "config": dict(config),
        "versions": dict(provenance["versions"]) if provenance else versions(),
        "provenance": dict(provenance["provenance"]) if provenance else None,
        "dropped": _reason_counts(DROP_REASONS, dropped),
        "failed": _reason_counts(FAIL_REASONS, failed),
        "splits": {split: stats[split] for split in SPLITS},
        "report": report.REPORT_NAME,
        "stratification": {
            "keys": list(STRATIFICATION_KEYS),
            "seed": assignment.seed,
            "ratios": dict(zip(SPLITS, assignment.ratios)),
            "reused_indices": assignment.reused,
            "patients": {split: patients.get(split, 0) for split in SPLITS},
            "indices": INDICES_NAME,
        },
    }
    meta["split_source"] = assignment.source
    if assignment.reused:
        meta["patients_not_in_indices"] = assignment.patients_not_in_indices
    if assignment.official is not None:
        meta["official_split"] = {"table": schema.TABLES["split"].relpath,
                                  **dataclasses.asdict(assignment.official)}
    return meta


def metadata_bytes(meta: Mapping[str, Any]) -> bytes:
    return (json.dumps(meta, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()


def failed_bytes(dead_letters: Iterable[DeadLetter]) -> bytes:
    """failed/ as JSON lines (`DeadLetter.to_json`), sorted by record id, then stage, reason
    and the rest, so the file is deterministic."""
    lines = sorted((d.record_id, d.stage, d.reason, d.to_json()) for d in dead_letters)
    return "".join(line + "\n" for *_, line in lines).encode()


def _split_of_ref(ref: RecordRef, assignment: SplitAssignment) -> tuple[str, RecordRef]:
    return assignment.split_of(ref.subject_id), ref


def check_failed_fraction(
    dead: Sequence[DeadLetter], records: int, max_failed_fraction: float
) -> None:
    """The loss guard: more failed records than `max_failed_fraction` of the cohort (or an
    empty cohort) fails the run before it commits.

    Raises:
        ConservationError: one line with the counts, the top reason and an example path.
    """
    if records <= 0:
        raise ConservationError(
            "the cohort is empty: no frontal image links to an ED stay; nothing was committed")
    failed = [d for d in dead if d.stage != "join"]  # bad timestamps are not records
    if len(failed) <= max_failed_fraction * records:
        return
    reasons = collections.Counter(d.reason for d in failed)
    reason, n = min(reasons.items(), key=lambda item: (-item[1], item[0]))
    first = min((d for d in failed if d.reason == reason), key=lambda d: d.record_id)
    example = first.detail.rsplit(": ", 1)[-1]
    raise ConservationError(
        f"{len(failed)} of {records} records failed ({len(failed) / records:.1%} > "
        f"--max_failed_fraction {max_failed_fraction:g}); top reason {reason} ({n}), e.g. "
        f"{example}; see {FAILED_DIR}/; nothing was committed")


class _CommitFn(beam.DoFn):
    """Checks the run's ledger and loss guard, then publishes failed/, the indices, the report
    (a failed report is recorded, not fatal), DATASET_CARD.md and metadata.json (last), then
    drops the temporaries."""

    def __init__(self, output_dir: str, settings: dict, report_examples: int,
                 tables: Sequence[str], max_failed_fraction: float) -> None:
        self._output_dir = output_dir
        self._settings = settings
        self._report_examples = report_examples
        self._tables = tuple(tables)
        self._max_failed_fraction = max_failed_fraction

    def process(
        self,
        placed: list[PlacedChunk],
        stats: dict,
        dead: list[DeadLetter],
        dropped: list[tuple[str, int]],
        assignment: SplitAssignment,
        ledger: dict[str, int],
        images: Optional[tuple[int, int, int]] = None,
    ) -> Iterable[dict]:
        chunks = [p.info for p in placed]
        check_conservation({
            **ledger,
            ledger_names.ARRIVED_CHUNK_RECORDS: sum(c.records for c in chunks),
            ledger_names.ARRIVED_SPLIT_RECORDS: sum(s["records"] for s in stats.values()),
            ledger_names.ARRIVED_DEAD_LETTERS: len(dead),
            ledger_names.ARRIVED_DROPPED: sum(n for _, n in dropped),
            **assignment.arrived(),
        }, self._tables)
        out = self._output_dir
        storage.write_bytes(storage.join(out, FAILED_DIR, FAILED_NAME), failed_bytes(dead))
        check_failed_fraction(dead, ledger.get("cohort/records", 0), self._max_failed_fraction)
        settings = self._settings
        if images is not None:
            settings = {**settings, "provenance": with_images(settings["provenance"], images)}
        meta = build_metadata(
            chunks=chunks,
            stats=stats,
            failed=collections.Counter(d.reason for d in dead).items(),
            dropped=dropped,
            assignment=assignment,
            **settings,
        )
        # Only now, with every count checked, do the chunks take their names.
        place_chunks(out, placed)
        storage.write_bytes(storage.join(out, INDICES_NAME), indices_bytes(assignment))
        # Temporary files of local writes that a failed bundle abandoned.
        storage.delete(path for split in SPLITS
                       for path in storage.temporaries(storage.join(out, split)))
        meta.update(report.publish_report(out, meta, self._report_examples))
        dataset_card.write_card(out, meta)
        storage.write_bytes(storage.join(out, METADATA_NAME), metadata_bytes(meta))
        try:
            storage.delete_tree(tmp_dir(out))
        except OSError as err:
            # The output is complete; leftovers only cost space, and a re-run clears them.
            _LOG.warning("Could not remove %s: %s", tmp_dir(out), type(err).__name__)
        yield meta


class WriteMetadata(beam.PTransform):
    """Commits the output: failed/, stratification_indices.json, the report, then metadata.json.

    Input: a dict of PCollections:
        "chunks": `PlacedChunk` of every chunk (`WriteChunks`' output), renamed into place
            here once the counts add up.
        "refs": `RecordRef` of every record written (`PreprocessGroups`' output).
        "assignment": the one-element `SplitAssignment` PCollection (`SplitPatients`).
        "dead_letters": `records.DeadLetter` of every stage, flattened.
        "dropped": the reason string of every image that is not a record (`JoinCohort`).
        "ledger": (name, total) of every stage's ledger (`transforms.ledger.SumLedger`).
        "images" (optional): `provenance.image_tally` sums of the cohort's images (one per
            group), recorded as provenance.inputs.images.
    Output: the metadata.json document (one dict), once it is written. Before anything is
    published the ledger must add up (`transforms.ledger.check_conservation`) and at most
    `max_failed_fraction` of the records may have failed (`check_failed_fraction`);
    otherwise the step raises ConservationError and no metadata.json is written.

    Args:
        output_dir: local dir or gs:// URI of the dataset.
        config: the configuration recorded in metadata.json (JSON-serialisable); its
            "max_text_length" sets the histogram's bins.
        image_size: side of the stored square images.
        feature_names: names of clinical_data's columns (default features.FEATURE_NAMES).
        label_names: names of the labels (default schema.CHEXPERT_LABELS).
        report_examples: example records per split shown in the report (image thumbnail and
            the start of the note: patient data). 0, the default, shows none.
        tables: the tables the join read (their rows-read counts must be in the ledger).
        max_failed_fraction: the largest share of the records that may fail (dead letters).
        provenance: versions, digests and commit for metadata.json (`provenance.collect()`);
            None: collected here, once, at construction on the launcher, for the text
            settings in `config` ("embedding_model", "knowledge_base", "tokenizer").
    """

    INPUTS = ("chunks", "refs", "assignment", "dead_letters", "dropped", "ledger")

    def __init__(
        self,
        output_dir: str,
        config: Mapping[str, Any],
        *,
        image_size: int,
        feature_names: Optional[Sequence[str]] = None,
        label_names: Sequence[str] = schema.CHEXPERT_LABELS,
        report_examples: int = 0,
        tables: Sequence[str] = (),
        max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION,
        provenance: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__()
        if not 0 <= max_failed_fraction <= 1:
            raise ValueError(f"max_failed_fraction must be in [0, 1], got {max_failed_fraction}")
        self._tables = tuple(tables)
        self._max_failed_fraction = float(max_failed_fraction)
        if feature_names is None:
            from transforms.text.features import FEATURE_NAMES

            feature_names = FEATURE_NAMES
        json.dumps(dict(config), allow_nan=False)  # fail now, not after the chunks
        if report_examples < 0:
            raise ValueError(f"report_examples must be >= 0, got {report_examples}")
        self._output_dir = output_dir.rstrip("/")
        self._report_examples = int(report_examples)
        self._max_text_length = int(config["max_text_length"])
        self._settings = {
            "config": dict(config),
            "image_size": int(image_size),
            "feature_names": list(feature_names),
            "label_names": list(label_names),
            "provenance": dict(provenance) if provenance is not None else collect(
                config.get("embedding_model"), config.get("knowledge_base"),
                config.get("tokenizer")),
        }

    def expand(self, inputs: Mapping[str, beam.PCollection]) -> beam.PCollection:
        missing = [name for name in self.INPUTS if name not in inputs]
        if missing:
            raise ValueError(f"WriteMetadata needs the inputs {missing}")
        assignment = beam.pvalue.AsSingleton(inputs["assignment"])
        stats = (
            inputs["refs"]
            | "SplitOfRef" >> beam.Map(_split_of_ref, assignment)
            | "SplitStats" >> beam.CombineGlobally(
                _SplitStatsFn(self._settings["feature_names"], self._max_text_length,
                              self._settings["label_names"]))
        )
        images = [] if "images" not in inputs else [beam.pvalue.AsSingleton(
            inputs["images"] | "ImageList" >> beam.CombineGlobally(add_tallies))]
        dead = inputs["dead_letters"] | "AllDeadLetters" >> beam.combiners.ToList()
        dropped = (
            inputs["dropped"]
            | "CountDropped" >> beam.combiners.Count.PerElement()
            | "AllDropped" >> beam.combiners.ToList()
        )
        return (
            inputs["chunks"]
            | "AllChunks" >> beam.combiners.ToList()
            | "Commit" >> beam.ParDo(
                _CommitFn(self._output_dir, self._settings, self._report_examples,
                          self._tables, self._max_failed_fraction),
                beam.pvalue.AsSingleton(stats),
                beam.pvalue.AsSingleton(dead),
                beam.pvalue.AsSingleton(dropped),
                assignment,
                beam.pvalue.AsDict(inputs["ledger"]),
                *images,
            )
        )
