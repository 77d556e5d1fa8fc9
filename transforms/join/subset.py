"""`--limit`: a deterministic subset of whole patients, chosen before the join.

A quick run on the real tables should not hold the whole join. The subjects are chosen from
two small inputs, the frontal images and the ED stays' bounds: each subject's linkable images
(the cohort's stay rule, `cohort.pick_stay`) are counted, subjects are taken in the order of a
sha256 of (seed, subject_id) until their linkable images reach the limit, and only their rows
cross the join. Whole patients, so the split stays patient-level.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Iterable, Iterator

import apache_beam as beam

from transforms import records
from transforms.ledger import LEDGER_TAG, Tally
from transforms.join.tables import columns

NOT_IN_LIMIT = f"cohort/{records.DROP_NOT_IN_LIMIT}"


def patient_draw(subject_id: int, seed: int) -> float:
    """A stable uniform draw in [0, 1) per patient (hashlib: the same on every worker)."""
    digest = hashlib.sha256(f"limit:{seed}:{subject_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose_subjects(linkable: Iterable[tuple[int, int]], limit: int, seed: int) -> frozenset:
    """The subjects taken in draw order until their linkable images reach `limit`.

    Args:
        linkable: (subject_id, linkable images) for every subject with a frontal image.
    """
    chosen, total = set(), 0
    for _, subject_id, n in sorted((patient_draw(s, seed), s, n) for s, n in linkable):
        if total >= limit:
            break
        if n:
            chosen.add(subject_id)
            total += n
    return frozenset(chosen)


class _StayBoundsFn(beam.DoFn):
    """edstays row -> (subject_id, (stay_id, intime, outtime)) for subjects with an image."""

    def __init__(self) -> None:
        cols = columns("edstays")
        self._idx = tuple(cols.index(c) for c in ("subject_id", "stay_id", "intime", "outtime"))

    def process(self, row: tuple, subjects: frozenset) -> Iterator[tuple[int, tuple]]:
        subject_id, stay_id, intime, outtime = (row[i] for i in self._idx)
        if subject_id in subjects:
            yield subject_id, (stay_id, intime, outtime)


def _linkable(element: tuple[int, dict]) -> tuple[int, int]:
    from transforms.join.cohort import EdStay, parse_table_datetime, pick_stay, unpack_rows

    subject_id, groups = element
    stays = []
    for stay_id, intime, outtime in groups["stays"]:
        start, end = parse_table_datetime(intime), parse_table_datetime(outtime)
        if start is not None and end is not None:
            stays.append(EdStay(stay_id, None, start, end, ()))
    n = sum(
        pick_stay(dt.datetime.fromisoformat(image[3]), stays) is not None
        for packed in groups["images"] for image in unpack_rows(packed)
    )
    return subject_id, n


class ChooseSubjects(beam.PTransform):
    """Input: (images keyed by subject as `cohort._SplitImagesFn` emits them, the edstays
    rows). Output: one frozenset of chosen subject ids.

    Args:
        limit: about how many records the chosen subjects hold.
        seed: seed of the subjects' order.
        subjects: AsSingleton side input, the frozenset of subjects with a frontal image.
    """

    def __init__(self, limit: int, seed: int, subjects) -> None:
        super().__init__()
        self._limit = limit
        self._seed = seed
        self._subjects = subjects

    def expand(self, inputs) -> beam.PCollection:
        images, edstays = inputs
        stays = edstays | "StayBounds" >> beam.ParDo(_StayBoundsFn(), self._subjects)
        return (
            {"images": images, "stays": stays}
            | "GroupImagesAndStays" >> beam.CoGroupByKey()
            | "CountLinkable" >> beam.Map(_linkable)
            | "AllSubjects" >> beam.combiners.ToList()
            | "Choose" >> beam.Map(choose_subjects, self._limit, self._seed)
        )


class _KeepSubjectsFn(beam.DoFn):
    def __init__(self) -> None:
        self._tally = Tally([NOT_IN_LIMIT])

    def start_bundle(self) -> None:
        self._tally.start()

    def finish_bundle(self):
        yield from self._tally.flush()

    def process(self, image: tuple[int, bytes], chosen: frozenset):
        if image[0] in chosen:
            yield image
        else:
            self._tally.inc(NOT_IN_LIMIT)
            yield beam.pvalue.TaggedOutput(records.DROPPED_TAG, records.DROP_NOT_IN_LIMIT)


class KeepSubjects(beam.PTransform):
    """Keeps the images of the chosen subjects. Output: a dict: "images", DROPPED_TAG (one
    DROP_NOT_IN_LIMIT per image left out) and LEDGER_TAG."""

    def __init__(self, chosen) -> None:
        super().__init__()
        self._chosen = chosen

    def expand(self, images: beam.PCollection) -> dict[str, beam.PCollection]:
        kept = images | "KeepChosen" >> beam.ParDo(_KeepSubjectsFn(), self._chosen).with_outputs(
            records.DROPPED_TAG, LEDGER_TAG, main="images")
        return {"images": kept.images, records.DROPPED_TAG: kept[records.DROPPED_TAG],
                LEDGER_TAG: kept[LEDGER_TAG]}
