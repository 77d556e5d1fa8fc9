"""The text stage: clinical features, an enhanced note with retrieved knowledge, and its tokens.

For each sample `{"cohort": CohortRecord, ...}` the stage adds:

    "clinical_data"        np.float32 [F]  transforms.features.FEATURE_NAMES order, 0.0 if missing
    "clinical_mask"        np.bool_ [F]    True where the value was observed and valid
    "enhanced_note"        str             readable note, sections joined by newlines
    "text_input_ids"       np.int32 [T]    [CLS] section tokens ... [SEP], T <= max_text_length
    "attention_segments"   list of (name, start, end) token spans, end exclusive
    "retrieved_knowledge"  list of knowledge-base snippet ids, best first

The note holds only what was known when the X-ray was taken: demographics, arrival, the chief
complaint, triage, vitals and medications charted at or before the study, and generic
knowledge retrieved for the complaint and abnormal findings. Nothing from ed/diagnosis,
the disposition, hadm_id, the ED outtime, dod or the CheXpert labels ever enters it.

Tokens: each section's text is tokenized without special tokens (one batched call per batch
of samples), then laid out as [CLS] + sections in order + [SEP], cut at max_text_length (the
last sections are cut first: the retrieved knowledge goes before the record's facts). Segments
cover every token exactly once, in order: ("special", 0, 1) for [CLS], one span per section
that kept at least one token, and ("special", T - 1, T) for [SEP]. Since BERT-style tokenizers
split on whitespace, the sections' tokens are the tokens of `enhanced_note` itself.

Logs and dead-letter details never hold note text, only ids and exception types.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from transforms import features, knowledge, records
from transforms.errors import InputError
from transforms.knowledge import KnowledgeRetriever, Snippet
from transforms.ledger import LEDGER_TAG, Tally

STAGE = "text"
METRICS_NAMESPACE = "notes"
FAILED_TEXT = f"{METRICS_NAMESPACE}/failed/{records.FAIL_TEXT}"
DEFAULT_MAX_TEXT_LENGTH = 8192
DEFAULT_BATCH_SIZE = 32

SECTION_DEMOGRAPHICS = "demographics"
SECTION_STUDY = "study"
SECTION_CHIEF_COMPLAINT = "chief_complaint"
SECTION_TRIAGE = "triage"
SECTION_VITALS = "vitals"
SECTION_MEDICATIONS = "medications"
SECTION_KNOWLEDGE = "retrieved_knowledge"
SECTIONS: tuple[str, ...] = (
    SECTION_DEMOGRAPHICS, SECTION_STUDY, SECTION_CHIEF_COMPLAINT, SECTION_TRIAGE,
    SECTION_VITALS, SECTION_MEDICATIONS, SECTION_KNOWLEDGE,
)
SPECIAL_SEGMENT = "special"  # the [CLS] and [SEP] tokens
# Findings that say how sick, not what with: in the note, not in the retrieval query.
QUERY_EXCLUDED_FINDINGS = frozenset({"high triage acuity", "severe pain"})

_ARRIVAL_TEXT = {
    "AMBULANCE": "arrived by ambulance",
    "WALK IN": "walked in",
    "HELICOPTER": "arrived by helicopter",
    "OTHER": "arrived by other means",
    "UNKNOWN": "arrival mode unknown",
}
_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- note text
def _num(value: float) -> str:
    """98.0 -> "98", 98.25 -> "98.2" (half-even, deterministic)."""
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _vitals_phrase(values: Mapping[str, Optional[float]], prefix: str) -> str:
    def get(name: str) -> Optional[float]:
        return values.get(f"{prefix}_{name}")

    parts = []
    for name, label, unit in (
        ("temperature", "temperature", " F"), ("heartrate", "heart rate", " bpm"),
        ("resprate", "respiratory rate", "/min"), ("o2sat", "SpO2", "%"),
    ):
        value = get(name)
        parts.append(f"{label} {_num(value)}{unit}" if value is not None
                     else f"{label} not recorded")
    sbp, dbp = get("sbp"), get("dbp")
    if sbp is not None and dbp is not None:
        parts.append(f"blood pressure {_num(sbp)}/{_num(dbp)} mmHg")
    elif sbp is not None:
        parts.append(f"systolic blood pressure {_num(sbp)} mmHg")
    elif dbp is not None:
        parts.append(f"diastolic blood pressure {_num(dbp)} mmHg")
    else:
        parts.append("blood pressure not recorded")
    pain = get("pain")
    parts.append(f"pain {_num(pain)}/10" if pain is not None else "pain not recorded")
    return ", ".join(parts)


def _findings_phrase(findings: Sequence[str]) -> str:
    return f"Abnormal: {', '.join(findings)}." if findings else "No abnormal vital signs."


def build_note_sections(
    record: records.CohortRecord,
    values: Mapping[str, Optional[float]],
    snippets: Sequence[Snippet] = (),
) -> list[tuple[str, str]]:
    """The note's sections as (name, text), in SECTIONS order.

    Args:
        record: the cohort record (its raw chief complaint and medication names are used).
        values: `features.parse_clinical(record)`: parsed, plausible values or None.
        snippets: retrieved knowledge, best first.
    """
    age, male = values.get("age_years"), values.get("gender_male")
    who = f"{int(age)}-year-old" if age is not None else "Patient of unknown age,"
    sex = {1.0: "male", 0.0: "female"}.get(male, "sex not recorded")
    arrival = features.arrival_category((record.stay or {}).get("arrival_transport"))
    prior = int(values.get("prior_admissions") or 0)
    demographics = (
        f"Demographics: {who} {sex}; {_ARRIVAL_TEXT.get(arrival, 'arrival mode not recorded')}; "
        f"{prior} prior hospital admission{'s' if prior != 1 else ''}."
    )
    hours = values.get("hours_since_ed_arrival")
    timing = (f", {_num(hours)} hours after arrival in the emergency department"
              if hours is not None else "")
    study = f"Study: frontal chest radiograph, {record.view_position} view{timing}."

    complaint = " ".join(((record.triage or {}).get("chiefcomplaint") or "").split())
    if complaint:
        expanded = knowledge.expand_abbreviations(complaint)
        extra = f" ({expanded})" if expanded != knowledge.normalize_text(complaint) else ""
        chief = f"Chief complaint: {complaint}{extra}."
    else:
        chief = "Chief complaint: not recorded."

    if record.triage is None:
        triage = "Triage: no triage assessment recorded."
    else:
        acuity = values.get("triage_acuity")
        triage = (
            f"Triage: {_vitals_phrase(values, 'triage')}; acuity "
            f"{'ESI ' + _num(acuity) if acuity is not None else 'not recorded'}. "
            + _findings_phrase(features.abnormal_findings(values, "triage"))
        )

    n_rows = len(record.vitals)
    if n_rows:
        vitals = (
            f"Vital signs before the X-ray: {n_rows} measurement{'s' if n_rows != 1 else ''}; "
            f"latest values: {_vitals_phrase(values, 'last')}. "
            + _findings_phrase(features.abnormal_findings(values, "last"))
        )
    else:
        vitals = "Vital signs before the X-ray: none recorded."

    meds = [" ".join(m.split()) for m in record.medications if m and m.strip()]
    medications = (
        f"Medications ({len(meds)} reconciled before the X-ray): {', '.join(meds)}."
        if meds else "Medications: none reconciled before the X-ray."
    )

    if snippets:
        knowledge_text = "Related knowledge: " + " ".join(s.text for s in snippets)
    else:
        knowledge_text = "Related knowledge: none retrieved."
    return [
        (SECTION_DEMOGRAPHICS, demographics),
        (SECTION_STUDY, study),
        (SECTION_CHIEF_COMPLAINT, chief),
        (SECTION_TRIAGE, triage),
        (SECTION_VITALS, vitals),
        (SECTION_MEDICATIONS, medications),
        (SECTION_KNOWLEDGE, knowledge_text),
    ]


def note_text(sections: Sequence[tuple[str, str]]) -> str:
    """The enhanced note: the sections' texts, one per line."""
    return "\n".join(text for _, text in sections)


# ----------------------------------------------------------------------------- tokens
Segment = tuple[str, int, int]


def assemble_tokens(
    section_ids: Sequence[tuple[str, Sequence[int]]],
    cls_id: int,
    sep_id: int,
    max_length: int,
) -> tuple[np.ndarray, list[Segment]]:
    """[CLS] + each section's ids + [SEP], cut to max_length, with its segments.

    Returns:
        int32 token ids (length <= max_length) and (name, start, end) spans covering every
        token once, in order; sections left with no token have no span.

    Raises:
        ValueError: max_length < 2 (no room for [CLS] and [SEP]).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 for [CLS] and [SEP], got {max_length}")
    ids = [cls_id]
    segments: list[Segment] = [(SPECIAL_SEGMENT, 0, 1)]
    budget = max_length - 2
    for name, tokens in section_ids:
        take = list(tokens[: budget - (len(ids) - 1)])
        if take:
            segments.append((name, len(ids), len(ids) + len(take)))
            ids.extend(take)
    segments.append((SPECIAL_SEGMENT, len(ids), len(ids) + 1))
    ids.append(sep_id)
    return np.asarray(ids, dtype=np.int32), segments


def tokenize_notes(
    tokenizer: Any,
    notes: Sequence[Sequence[tuple[str, str]]],
    max_length: int,
) -> list[tuple[np.ndarray, list[Segment]]]:
    """Tokenizes the sections of several notes in one batched call (no padding, so each
    text's tokens do not depend on the batch), then assembles each note's ids and segments."""
    texts = [text for sections in notes for _, text in sections]
    if not texts:
        return []
    encoded = tokenizer(
        texts, add_special_tokens=False, return_attention_mask=False,
        return_token_type_ids=False, truncation=False, padding=False,
    )["input_ids"]
    results, offset = [], 0
    for sections in notes:
        chunk = encoded[offset: offset + len(sections)]
        offset += len(sections)
        pairs = [(name, ids) for (name, _), ids in zip(sections, chunk)]
        results.append(assemble_tokens(pairs, tokenizer.cls_token_id, tokenizer.sep_token_id,
                                       max_length))
    return results


# ----------------------------------------------------------------------------- resources
class TextResources:
    """What one worker process loads once: the retriever (model + embedded knowledge base)
    and the tokenizer. A plain class, so `shared.Shared` can hold a weak reference to it."""

    def __init__(self, retriever: KnowledgeRetriever, tokenizer: Any) -> None:
        self.retriever = retriever
        self.tokenizer = tokenizer
        # A fast tokenizer's Rust object is borrowed mutably while it encodes: one at a time.
        self.tokenizer_lock = threading.Lock()


def load_tokenizer(folder: str) -> Any:
    """A fast Hugging Face tokenizer from a local folder (no length warning: we cut ourselves).

    Raises:
        InputError: the folder has no fast tokenizer or no [CLS]/[SEP] tokens.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"--tokenizer {folder}: not a fast tokenizer (needs tokenizer.json)")
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise InputError(f"--tokenizer {folder}: the tokenizer has no [CLS]/[SEP] tokens")
    tokenizer.model_max_length = 1 << 30
    return tokenizer


def load_text_resources(
    embedding_model: Optional[str] = None,
    knowledge_base: Optional[str] = None,
    tokenizer: Optional[str] = None,
) -> TextResources:
    """Loads the model, embeds the knowledge base and loads the tokenizer (defaults: the
    offline MiniLM, the bundled knowledge base, the model's own tokenizer). gs:// folders are
    copied to a temporary local folder for the load, then removed."""
    started = time.perf_counter()
    snippets = knowledge.load_knowledge_base(knowledge_base)
    with knowledge.local_model_dir(embedding_model or knowledge.default_model_path()) as folder:
        model = knowledge.load_model(folder)
        loaded_tokenizer = load_tokenizer(folder) if tokenizer is None else None
    if tokenizer is not None:
        with knowledge.local_model_dir(tokenizer, flag="--tokenizer") as folder:
            loaded_tokenizer = load_tokenizer(folder)
    retriever = KnowledgeRetriever(model, snippets)
    _log.info("text resources loaded in %.1f s (%d knowledge snippets)",
              time.perf_counter() - started, len(snippets))
    return TextResources(retriever, loaded_tokenizer)


_SHARED_LOCK = threading.Lock()
_SHARED_HANDLES: dict[tuple[Optional[str], ...], shared.Shared] = {}


def shared_text_resources(
    embedding_model: Optional[str] = None,
    knowledge_base: Optional[str] = None,
    tokenizer: Optional[str] = None,
) -> TextResources:
    """The process's `TextResources` for this configuration, loaded on first use.

    Every DoFn instance and thread of a worker process (and every pipeline the process runs)
    gets the same object through one `shared.Shared` handle per configuration; callers keep
    the returned object referenced while they use it (Shared holds it weakly).
    """
    key = (embedding_model, knowledge_base, tokenizer)
    with _SHARED_LOCK:
        handle = _SHARED_HANDLES.setdefault(key, shared.Shared())
    return handle.acquire(lambda: load_text_resources(*key), tag=key)


# ----------------------------------------------------------------------------- builder
@dataclasses.dataclass
class BuildStats:
    """Counters of one `NoteBuilder.build` call, for metrics and the benchmark."""

    built: int = 0
    failed: int = 0
    cache: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    prepare_seconds: float = 0.0  # features, retrieval (embedding included) and note text
    tokenize_seconds: float = 0.0


class NoteBuilder:
    """Builds the text outputs of a batch of samples with loaded `TextResources`.

    Thread-safe: retrieval and tokenization take the resources' locks.
    """

    def __init__(self, resources: TextResources, max_text_length: int = DEFAULT_MAX_TEXT_LENGTH,
                 top_k: int = knowledge.DEFAULT_TOP_K) -> None:
        self._resources = resources
        self._max_text_length = max_text_length
        self._top_k = top_k

    def _prepare(self, record: records.CohortRecord, cache_counts: collections.Counter):
        values = features.parse_clinical(record)
        complaint = (record.triage or {}).get("chiefcomplaint")
        findings = [f for f in features.all_abnormal_findings(values)
                    if f not in QUERY_EXCLUDED_FINDINGS]
        (complaint or "").encode("utf-8")  # malformed text (lone surrogates) fails here
        snippets = self._resources.retriever.retrieve(complaint, findings, self._top_k,
                                                      cache_counts)
        sections = build_note_sections(record, values, snippets)
        note = note_text(sections)
        note.encode("utf-8")
        return values, snippets, sections, note

    def build(self, samples: Sequence[dict[str, Any]], stats: Optional[BuildStats] = None
              ) -> list[Union[dict[str, Any], records.DeadLetter]]:
        """One output per input, in order: the sample with the text keys added (a new dict),
        or a DeadLetter (stage "text", reason FAIL_TEXT) for a record whose text is malformed.
        """
        stats = stats if stats is not None else BuildStats()
        prepared: list[Any] = []
        start = time.perf_counter()
        for sample in samples:
            record = sample["cohort"]
            try:
                prepared.append(self._prepare(record, stats.cache))
            except ValueError as err:  # e.g. UnicodeEncodeError: text with lone surrogates
                _log.warning("text failed for record %s: %s", record.record_id,
                             type(err).__name__)
                prepared.append(records.DeadLetter.of(
                    record, STAGE, records.FAIL_TEXT, type(err).__name__))
        stats.prepare_seconds += time.perf_counter() - start

        start = time.perf_counter()
        good = [p for p in prepared if not isinstance(p, records.DeadLetter)]
        with self._resources.tokenizer_lock:
            tokens = iter(tokenize_notes(self._resources.tokenizer, [p[2] for p in good],
                                         self._max_text_length))
        stats.tokenize_seconds += time.perf_counter() - start

        outputs: list[Union[dict[str, Any], records.DeadLetter]] = []
        for sample, item in zip(samples, prepared):
            if isinstance(item, records.DeadLetter):
                stats.failed += 1
                outputs.append(item)
                continue
            values, snippets, _, note = item
            ids, segments = next(tokens)
            data, mask = features.feature_arrays(values)
            stats.built += 1
            outputs.append({
                **sample,
                "enhanced_note": note,
                "text_input_ids": ids,
                "attention_segments": segments,
                "clinical_data": data,
                "clinical_mask": mask,
                "retrieved_knowledge": [s.id for s in snippets],
            })
        return outputs


# ----------------------------------------------------------------------------- Beam
class _BuildNotesFn(beam.DoFn):
    """Builds the text of a batch of samples (`beam.BatchElements`) in one tokenizer call."""

    def __init__(self, embedding_model: Optional[str], knowledge_base: Optional[str],
                 tokenizer: Optional[str], max_text_length: int, top_k: int) -> None:
        self._paths = (embedding_model, knowledge_base, tokenizer)
        self._max_text_length = max_text_length
        self._top_k = top_k
        self._tally = Tally([FAILED_TEXT])

    def setup(self) -> None:
        # One load per process, shared by every instance and thread (see Shared).
        self._resources = shared_text_resources(*self._paths)
        self._builder = NoteBuilder(self._resources, self._max_text_length, self._top_k)
        self._built = Metrics.counter(METRICS_NAMESPACE, "notes_built")
        self._cache_hits = Metrics.counter(METRICS_NAMESPACE, "embedding_cache_hits")
        self._cache_misses = Metrics.counter(METRICS_NAMESPACE, "embedding_cache_misses")

    def start_bundle(self) -> None:
        self._tally.start()

    def process(self, batch: list[dict[str, Any]]) -> Iterator[Any]:
        stats = BuildStats()
        results = self._builder.build(batch, stats)
        self._built.inc(stats.built)
        self._tally.inc(FAILED_TEXT, stats.failed)
        self._cache_hits.inc(stats.cache["hits"])
        self._cache_misses.inc(stats.cache["misses"])
        for result in results:
            if isinstance(result, records.DeadLetter):
                yield beam.pvalue.TaggedOutput(records.DEAD_LETTER_TAG, result)
            else:
                yield result

    def finish_bundle(self) -> Iterator[Any]:
        yield from self._tally.flush()


def check_text_config(
    embedding_model: Optional[str] = None,
    knowledge_base: Optional[str] = None,
    tokenizer: Optional[str] = None,
) -> None:
    """Fails fast, before any work, on text inputs that cannot be used: reads and parses the
    knowledge base once and looks into the model folders. The numeric settings are checked
    with the other flags (`pipelines.config`).

    Raises:
        InputError: naming the flag and the value (a missing folder or file, a malformed
            knowledge base).
    """
    knowledge.load_knowledge_base(knowledge_base)
    if embedding_model:
        knowledge.check_model_dir(embedding_model)
    if tokenizer:
        knowledge.check_model_dir(tokenizer, flag="--tokenizer",
                                  markers=("tokenizer.json", "tokenizer_config.json"))


class BuildNotes(beam.PTransform):
    """Adds clinical features, the enhanced note, its tokens and retrieved knowledge.

    Input: sample dicts `{"cohort": records.CohortRecord, ...}`.
    Output: a dict of PCollections:
        "samples" (records.SAMPLES_TAG): each input sample as a new dict with the keys "enhanced_note",
            "text_input_ids", "attention_segments", "clinical_data", "clinical_mask" and
            "retrieved_knowledge" added (see the module docstring).
        "dead_letter" (records.DEAD_LETTER_TAG): records.DeadLetter, stage "text", reason
            records.FAIL_TEXT, for a record whose text is malformed (e.g. not valid Unicode);
            the detail is the exception type, never the text.
        "ledger" (LEDGER_TAG): the failures counted (`transforms.ledger`).
    Every input leaves in exactly one of the first two. Beam counters in namespace "notes".

    Args:
        embedding_model: sentence-transformers folder, local or gs:// (default: offline
            all-MiniLM-L6-v2).
        knowledge_base: JSONL path, local or gs:// (default: the bundled knowledge base).
        tokenizer: tokenizer folder, local or gs:// (default: the embedding model's).
        max_text_length: most tokens per note, [CLS] and [SEP] included.
        top_k: knowledge snippets retrieved per record.
        batch_size: samples per tokenizer call (batches form within a bundle).

    The settings are taken as given: the pipeline checks them once, before building the graph
    (`pipelines.config`, `check_text_config`).
    """

    def __init__(
        self,
        embedding_model: Optional[str] = None,
        knowledge_base: Optional[str] = None,
        tokenizer: Optional[str] = None,
        max_text_length: int = DEFAULT_MAX_TEXT_LENGTH,
        top_k: int = knowledge.DEFAULT_TOP_K,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        super().__init__()
        self._fn_args = (embedding_model, knowledge_base, tokenizer, max_text_length, top_k)
        self._batch_size = batch_size

    def expand(self, samples: beam.PCollection) -> dict[str, beam.PCollection]:
        # Fixed-size batches, one tokenizer call each; a note's tokens do not depend on its
        # batch (no padding), so batching changes speed, never bytes.
        batches = samples | "Batch" >> beam.BatchElements(
            min_batch_size=self._batch_size, max_batch_size=self._batch_size)
        built = batches | "BuildText" >> beam.ParDo(_BuildNotesFn(*self._fn_args)).with_outputs(
            records.DEAD_LETTER_TAG, LEDGER_TAG, main=records.SAMPLES_TAG)
        return {
            records.SAMPLES_TAG: built[records.SAMPLES_TAG],
            records.DEAD_LETTER_TAG: built[records.DEAD_LETTER_TAG],
            LEDGER_TAG: built[LEDGER_TAG],
        }

