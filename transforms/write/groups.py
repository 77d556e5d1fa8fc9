"""Preprocess each group of records and write it once, as a chunk, where it is produced.

`PreprocessGroups` cuts each split's records into groups of `chunk_size` in the chunk order
(`transforms.write.layout`): only the joined records and small order keys cross its shuffle.
One worker then builds the notes of a whole group (one tokenizer call), preprocesses its
images and writes its records, in order, as one chunk file under `_tmp/groups/`, with a small
JSON sidecar (size, sha256, the refs and dead letters of the group). No record is read back:
`WriteChunks` renames finished groups into place and reassembles only the few that failures
left short. Temporary objects: two per group (tens of MB), not one per record.

Beam's local runner holds in memory whatever crosses a GroupByKey or waits on a side input, so
the heavy values never do: images and tensors live only inside one group's processing.

A re-run after a crash reuses every group whose fingerprint (`transforms.write.resume`) and
written bytes check out, and preprocesses only the others.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import uuid
from typing import Any, Iterable, Iterator, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms import records as rec
from transforms import storage
from transforms.chunks import record
from transforms.chunks.format import encode_chunk
from transforms.images import REASONS as IMAGE_REASONS
from transforms.images import ImageSettings, failed_counter, image_of, use_one_opencv_thread
from transforms.ledger import LEDGER_TAG, Tally
from transforms.records import CohortRecord, DeadLetter
from transforms.splits import SplitAssignment, record_stratum
from transforms.text import notes
from transforms.join import schema
from transforms.write import layout, provenance, resume

REFS_TAG = "refs"
GROUPS_TAG = "groups"
SPILLED = "spill/records_spilled"
REUSED = "spill/records_reused"
GROUPS_DIR = "groups"

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RecordRef:
    """A written record: what the split statistics and the report need, nothing heavy."""

    record_id: str
    subject_id: int
    study_id: int
    stratum: str  # splits.record_stratum
    labels: tuple[float, ...]  # 14 CheXpert labels, NaN missing
    # Facts the dataset report needs (`record.record_facts`: labels above, these).
    note_tokens: int = 0  # tokens of the enhanced note (after truncation)
    clinical_missing: tuple[int, ...] = ()  # indices of the clinical features that are missing


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    """One written group: where its chunk file is and which records it holds, in order."""

    split: str
    group: int
    record_ids: tuple[str, ...]
    path: str  # "" when every record of the group failed (no file)
    bytes: int
    sha256: str
    reused: bool = False
    images: tuple[int, int, int] = (0, 0, 0)  # provenance.image_tally of its records' images


def group_paths(output_dir: str, split: str, group: int, fingerprint: str) -> tuple[str, str]:
    """The chunk file and the sidecar of a group. Named by the fingerprint, so a retried bundle
    rewrites the same files and a changed input never finds a stale one."""
    stem = storage.join(resume.tmp_dir(output_dir), GROUPS_DIR,
                        f"{split}-{group:05d}-{fingerprint[:24]}")
    return stem + ".pt", stem + ".json"


def to_chunk_record(sample: dict, split: str) -> dict:
    """The chunk format's per-record dict (torch tensors) of a preprocessed sample.

    Each field (`record.FIELDS`) comes from the stage that fills it: the `CohortRecord`'s
    attribute of its name, the sample's key of its name (the image and text stages' numpy
    arrays and lists), or `split`.

    Raises:
        KeyError: a stage's key is missing from the sample.
    """
    cohort: CohortRecord = sample["cohort"]

    def stage_value(field: record.Field) -> Any:
        if field.stage == "cohort":
            return getattr(cohort, field.name)
        if field.stage == "split":
            return split
        return sample[field.name]

    return record.from_stages(stage_value)


def record_ref(cohort: CohortRecord, chunk_record: dict) -> RecordRef:
    """The ref of a processed record (`to_chunk_record`'s output)."""
    return RecordRef(record_id=cohort.record_id, subject_id=int(cohort.subject_id),
                     study_id=int(cohort.study_id), stratum=record_stratum(cohort),
                     **record.record_facts(chunk_record))


def ledger_name(dead: DeadLetter) -> str:
    """The ledger entry that counts a dead letter of the text or image stage."""
    return notes.FAILED_TEXT if dead.stage == notes.STAGE else failed_counter(dead.reason)


def _identities(paths: Sequence[str], user_project: Optional[str]
                ) -> list[Optional[storage.FileStat]]:
    def one(path: str) -> Optional[storage.FileStat]:
        try:
            return storage.file_stat(path, user_project)
        except FileNotFoundError:
            return None

    if not any(storage.is_gcs(p) for p in paths):
        return [one(p) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # one metadata call each
        return list(pool.map(one, paths))


class _PreprocessGroupFn(beam.DoFn):
    """((split, group), records) -> the group's refs, its GroupInfo, its dead letters."""

    def __init__(self, output_dir: str, fingerprint: str, seed: int, text: tuple,
                 images: ImageSettings) -> None:
        self._output_dir = output_dir
        self._fingerprint = fingerprint
        self._seed = seed
        self._text = text  # embedding_model, knowledge_base, tokenizer, max_text_length, top_k
        self._images = images
        self._run_id = uuid.uuid4().hex  # made with the pipeline: one per run
        self._tally = Tally([SPILLED, REUSED, notes.FAILED_TEXT,
                             *(failed_counter(r) for r in IMAGE_REASONS)])
        self._bytes = Metrics.counter("spill", "bytes_spilled")
        self._groups = Metrics.counter("spill", "groups_written")

    def setup(self) -> None:
        use_one_opencv_thread()
        resume.record_run(self._output_dir, self._fingerprint, self._run_id)
        model, kb, tokenizer, max_text_length, top_k = self._text
        # One load per process, shared by every instance and thread.
        resources = notes.shared_text_resources(model, kb, tokenizer)
        self._builder = notes.NoteBuilder(resources, max_text_length, top_k)

    def start_bundle(self) -> None:
        self._tally.start()

    def finish_bundle(self):
        yield from self._tally.flush()

    def process(self, element: tuple[tuple[str, int], Iterable[CohortRecord]]) -> Iterator[Any]:
        (split, group), members = element
        members = sorted(members, key=lambda r: layout.record_order_key(self._seed, r.record_id))
        images = _identities([r.image_path for r in members],
                             self._images.requester_pays_project)
        fingerprint = resume.group_fingerprint(self._fingerprint, split, group, members, images)
        chunk_path, sidecar_path = group_paths(self._output_dir, split, group, fingerprint)
        done = _reusable(chunk_path, sidecar_path, fingerprint, len(members))
        if done is None:
            done = self._build(split, group, members, fingerprint, chunk_path, sidecar_path)
        else:
            self._tally.inc(REUSED, len(done["refs"]))
        info, refs, dead = _outputs(split, group, chunk_path, done)
        info = dataclasses.replace(info, images=provenance.add_tallies(
            provenance.image_tally(schema.image_relpath(r.subject_id, r.study_id, r.record_id),
                                   identity)
            for r, identity in zip(members, images)))
        self._tally.inc(SPILLED, len(refs))
        for letter in dead:
            self._tally.inc(ledger_name(letter))
            yield beam.pvalue.TaggedOutput(rec.DEAD_LETTER_TAG, letter)
        yield beam.pvalue.TaggedOutput(GROUPS_TAG, info)
        yield from refs

    def _build(self, split: str, group: int, members: Sequence[CohortRecord],
               fingerprint: str, chunk_path: str, sidecar_path: str) -> dict:
        # The images decode on a second thread while this one builds the notes: decoding
        # releases the GIL and the notes mostly hold it, so in turn they left a core idle.
        # A record whose text fails has its image decoded for nothing, which costs only time.
        with concurrent.futures.ThreadPoolExecutor(1, "group-images") as pool:
            images = [pool.submit(image_of, r, self._images) for r in members]
            built = self._builder.build([rec.sample_from(r) for r in members])
            chunk_records, refs, dead = [], [], []
            for sample, image in zip(built, images):
                result = image.result()
                if isinstance(sample, DeadLetter):
                    dead.append(sample)
                    continue
                if isinstance(result, DeadLetter):
                    dead.append(result)
                    continue
                sample["image"], sample["image_box"] = result
                chunk_record = to_chunk_record(sample, split)
                chunk_records.append(chunk_record)
                refs.append(record_ref(sample["cohort"], chunk_record))
        data = encode_chunk(chunk_records, split=split) if chunk_records else b""
        del chunk_records
        if data:
            storage.write_bytes(chunk_path, data)
        done = {
            "fingerprint": fingerprint,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "refs": [dataclasses.asdict(r) for r in refs],
            "dead_letters": [dataclasses.asdict(d) for d in dead],
        }
        # The sidecar last: its presence says the group's file is whole.
        storage.write_bytes(sidecar_path, json.dumps(done, sort_keys=True).encode())
        self._bytes.inc(len(data))
        self._groups.inc()
        return done


def _reusable(chunk_path: str, sidecar_path: str, fingerprint: str, members: int
              ) -> Optional[dict]:
    """The sidecar of a group an earlier attempt finished, if it and its file check out."""
    try:
        done = json.loads(storage.read_bytes(sidecar_path))
    except FileNotFoundError:
        return None
    except ValueError:
        _LOG.warning("recomputing %s: its sidecar does not parse", chunk_path)
        return None
    try:
        ok = (done["fingerprint"] == fingerprint
              and len(done["refs"]) + len(done["dead_letters"]) == members)
        if ok and done["refs"]:
            data = storage.read_bytes(chunk_path)
            ok = len(data) == done["bytes"] and hashlib.sha256(data).hexdigest() == done["sha256"]
    except FileNotFoundError:
        ok = False
    except (KeyError, TypeError):
        ok = False
    if not ok:
        _LOG.warning("recomputing %s: it does not match its sidecar", chunk_path)
        return None
    return done


def _outputs(split: str, group: int, chunk_path: str, done: dict
             ) -> tuple[GroupInfo, list[RecordRef], list[DeadLetter]]:
    refs = [RecordRef(**{**r, "labels": tuple(r["labels"]),
                         "clinical_missing": tuple(r["clinical_missing"])})
            for r in done["refs"]]
    dead = [DeadLetter(**d) for d in done["dead_letters"]]
    info = GroupInfo(split=split, group=group, record_ids=tuple(r.record_id for r in refs),
                     path=chunk_path if refs else "", bytes=done["bytes"],
                     sha256=done["sha256"])
    return info, refs, dead


def _split_key(record: CohortRecord, assignment: SplitAssignment, seed: int
               ) -> tuple[str, tuple[bytes, str]]:
    return assignment.split_of(record.subject_id), layout.record_order_key(seed, record.record_id)


def _starts(element: tuple[str, Iterable[tuple[bytes, str]]], chunk_size: int
            ) -> tuple[str, list[tuple[bytes, str]]]:
    split, keys = element
    return split, layout.group_starts(list(keys), chunk_size)


def _group_key(record: CohortRecord, assignment: SplitAssignment, starts: dict, seed: int
               ) -> tuple[tuple[str, int], CohortRecord]:
    split = assignment.split_of(record.subject_id)
    key = layout.record_order_key(seed, record.record_id)
    return (split, layout.group_of(starts[split], key)), record


class PreprocessGroups(beam.PTransform):
    """Builds notes and images group by group and writes each group once, as a chunk file.

    Input: a tuple `(records, assignment)`: the joined `CohortRecord`s and the one-element
        `SplitAssignment` PCollection of `splits.SplitPatients` (a side input).
    Output: a dict: `RecordRef` of every record written (REFS_TAG), `GroupInfo` of every group
        (GROUPS_TAG, for `WriteChunks`), `DeadLetter` of every record that failed
        (records.DEAD_LETTER_TAG: stage "text" or "image"), and the ledger (LEDGER_TAG:
        records spilled, reused, and failed by reason). Every record leaves as a ref or a
        dead letter.

    Args:
        output_dir: the dataset's output dir; groups go under `{output_dir}/_tmp/groups/`.
        chunk_size: records per group (= per chunk).
        seed: seed of the record order within each split.
        fingerprint: `resume.run_fingerprint` of the run.
        text: (embedding_model, knowledge_base, tokenizer, max_text_length, top_k).
        images: the image settings.
    """

    def __init__(self, output_dir: str, chunk_size: int, seed: int, fingerprint: str,
                 text: tuple, images: ImageSettings) -> None:
        super().__init__()
        layout.chunk_count(0, chunk_size)  # validates chunk_size
        self._chunk_size = int(chunk_size)
        self._seed = int(seed)
        self._fn = _PreprocessGroupFn(output_dir.rstrip("/"), fingerprint, self._seed,
                                      tuple(text), images)

    def expand(self, inputs: tuple[beam.PCollection, beam.PCollection]
               ) -> dict[str, beam.PCollection]:
        records, assignment = inputs
        split_of = beam.pvalue.AsSingleton(assignment)
        starts = (
            records
            | "OrderKey" >> beam.Map(_split_key, split_of, self._seed)
            | "KeysBySplit" >> beam.GroupByKey()
            | "GroupStarts" >> beam.Map(_starts, self._chunk_size)
        )
        out = (
            records
            | "KeyByGroup" >> beam.Map(_group_key, split_of, beam.pvalue.AsDict(starts),
                                       self._seed)
            # A GroupByKey's output is dealt key by key: the groups spread over the workers.
            | "Group" >> beam.GroupByKey()
            | "PreprocessGroup" >> beam.ParDo(self._fn).with_outputs(
                GROUPS_TAG, rec.DEAD_LETTER_TAG, LEDGER_TAG, main=REFS_TAG)
        )
        return {tag: out[tag] for tag in (REFS_TAG, GROUPS_TAG, rec.DEAD_LETTER_TAG,
                                          LEDGER_TAG)}
