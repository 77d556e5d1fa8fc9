"""DATASET_CARD.md: what a person needs to know before using an output, beside metadata.json.

`render_card` is a pure function of the metadata.json document (no time, no host, sorted
tables), so the card is byte-identical across runs like the rest of the output. It is written
just before metadata.json, which stays the last file of a run.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from transforms import storage

CARD_NAME = "DATASET_CARD.md"
_SPLITS = ("train", "val", "test")

_DUA = """\
> **Credentialed data.** This dataset is derived from MIMIC-IV, MIMIC-IV-ED and MIMIC-CXR-JPG,
> which PhysioNet distributes under the PhysioNet Credentialed Health Data Use Agreement.
> Everything in this folder (chunks, `failed/`, the report) is credentialed data too: use it
> only under that agreement, share it only with people who have signed it for these datasets,
> never publicly, and make no attempt to identify any individual. (Outputs of the synthetic
> demo hold no patient data, but carry this notice all the same.)"""

_COHORT = """\
- One record per frontal chest X-ray: ViewPosition in {views}. Null, LATERAL, LL and the
  rest are not frontal (counted as `not_frontal`).
- An image links to the emergency-department stay of the same `subject_id` whose
  [intime, outtime] contains the study's datetime (StudyDate + StudyTime); where several stays
  contain it, the latest intime wins. Images that link to no stay are not records (counted as
  `no_ed_stay`).
- Triage and patients attach by stay_id / subject_id; vital signs and medication
  reconciliation only with charttime at or before the study time (no look-ahead). CheXpert
  labels attach by study_id (all missing where the study has none). The ED's discharge
  diagnosis and disposition are outcomes and are never read.
- Physiologically impossible and unparsable values become missing, flagged in
  `clinical_mask`.
- Aggressive filtering (also drop records without a triage row or chief complaint): {aggressive}.
- Subset: {limit}."""

_LOAD = """\
```python
from torch.utils.data import DataLoader
from transforms.chunks import ChunkedDataset, collate_records

train = ChunkedDataset("THIS_FOLDER", "train", seed=0)   # local folder or gs:// URI
loader = DataLoader(train, batch_size=32, num_workers=4, collate_fn=collate_records)
```

Every chunk's size and sha256 are checked against `metadata.json` on first read. A chunk also
loads on its own: `torch.load(path, weights_only=True)`."""


def _value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(v) for v in value) or "none"
    return str(value)


def _cell(value: Any) -> str:
    return _value(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _counts(counts: Mapping[str, int]) -> str:
    rows = [(reason, n) for reason, n in sorted(counts.items())]
    total = sum(n for _, n in rows)
    return _table(("reason", "count"), [*rows, ("**total**", total)])


def _split_source(meta: Mapping[str, Any]) -> str:
    """How the patients were split (metadata.json "split_source")."""
    strat = meta.get("stratification", {})
    official = meta.get("official_split")
    if meta.get("split_source") == "official" and official:
        return (
            f"The official MIMIC-CXR-JPG split (`{official['table']}`, by subject; validate is "
            f"val): {official['patients_from_table']} patients from the table, "
            f"{official['patients_not_in_table']} absent from it assigned by a stable hash "
            f"(seed {strat.get('seed')}) against the shares "
            + ", ".join(f"{s} {strat.get('ratios', {}).get(s, 0):g}" for s in _SPLITS) + ", "
            f"{official['patients_with_conflicting_splits']} with rows in several splits put "
            "in the most restrictive (test, then val).")
    return (f"Stratified on {_value(strat.get('keys'))}, seed {strat.get('seed')}"
            + (", patients reused from a saved stratification_indices.json"
               if strat.get("reused_indices") else "") + ".")


_WHO = {"group": "you and your group", "owner": "you alone", "world": "every local user"}


def _access(config: Mapping[str, Any]) -> str:
    """Who may read the output: the DUA's rule, then the modes a local output was given."""
    preset = config.get("output_permissions")
    if preset in storage.PERMISSIONS:
        folder = storage.PERMISSIONS[preset]
        local = (f"written with folders {folder:04o} and files {folder & 0o666:04o} "
                 f"(`output_permissions` {preset}: {_WHO[preset]}), whatever the umask")
    else:
        local = "written with the modes its umask gave (not recorded)"
    return (
        "Only credentialed PhysioNet users who have signed the data use agreement for "
        "MIMIC-IV, MIMIC-IV-ED and MIMIC-CXR-JPG may read this output. A local output is "
        f"{local}; keep its group to such people. On gs:// the bucket's IAM decides: keep it "
        "private (`run_dataflow.sh`'s preflight refuses a bucket that grants `allUsers` or "
        "`allAuthenticatedUsers` a role).")


def _inputs(provenance: Mapping[str, Any]) -> list[str]:
    """The card's lines on the tables read (`provenance["inputs"]`), if recorded."""
    inputs = provenance.get("inputs") or {}
    tables = inputs.get("tables") or {}
    if not tables:
        return []
    rows = [(name, f"`{t['path']}`", t["bytes"],
             ", ".join(f"{k} {t[k]}" for k in ("sha256", "crc32c", "md5") if t.get(k)))
            for name, t in sorted(tables.items())]
    lines = ["", "Inputs read (checksums from GCS's object metadata, or sha256 of the local "
             "file):", "", _table(("table", "path", "bytes", "checksum"), rows)]
    images = inputs.get("images")
    if images:
        lines += ["", f"Images of the cohort (written and failed): {images['images']}, "
                  f"{images['bytes']} bytes, digest `{images['digest']}` ({images['rule']})."]
    return lines


def render_card(meta: Mapping[str, Any]) -> str:
    """The card's Markdown for a metadata.json document."""
    config = meta.get("config", {})
    splits = meta["splits"]
    chunks = {s: sum(1 for c in meta["chunks"] if c["split"] == s) for s in _SPLITS}
    strat = meta.get("stratification", {})
    # The official split has no target shares (its ratios only draw absent patients).
    ratios = {} if meta.get("split_source") == "official" else strat.get("ratios", {})
    split_rows = [(s, splits[s]["records"], splits[s]["patients"], chunks[s], ratios.get(s))
                  for s in _SPLITS]
    split_rows.append(("**total**", meta["total_records"],
                       sum(splits[s]["patients"] for s in _SPLITS), len(meta["chunks"]),
                       round(sum(ratios.values()), 6) if ratios else None))
    views = config.get("views")
    limit = config.get("limit") or 0
    provenance = meta.get("provenance") or {}
    report_line = (f"`{meta['report']}` (open it first: plots of every count here)"
                   if meta.get("report") else
                   f"not written ({meta.get('report_error', 'unknown error')}); "
                   "metadata.json holds every figure")
    parts = [
        "# Dataset card: MIMIC chest X-ray + emergency-department multimodal dataset",
        "",
        _DUA,
        "",
        "## Who may read it",
        "",
        _access(config),
        "",
        "## What this is",
        "",
        f"{meta['total_records']} records, one per frontal chest X-ray linked to an "
        "emergency-department stay, in fixed-size torch chunk files with a patient-level "
        "train/val/test split. Each record holds its ids (`record_id` = dicom_id, "
        f"subject_id, study_id, stay_id, hadm_id), the image ({meta['image_size']} x "
        f"{meta['image_size']} uint8, aspect kept, padded, with a mask of real pixels), the "
        "enhanced clinical note with its token ids and attention segments, "
        f"{len(meta.get('feature_names', []))} clinical features with a missing-value mask, "
        f"and the {len(meta.get('label_names', []))} CheXpert labels (NaN where missing). "
        "Sources: MIMIC-IV 3.1, MIMIC-IV-ED 2.2 and MIMIC-CXR-JPG 2.1.0 (or the project's "
        "synthetic MIMIC-shaped data, for the demo).",
        "",
        "## Cohort",
        "",
        _COHORT.format(
            views=", ".join(views) if isinstance(views, (list, tuple)) else _value(views),
            aggressive="on" if config.get("aggressive_filtering") else "off",
            limit=(f"a deterministic subset of whole patients, about {limit} records"
                   if limit else "none (every record)")),
        "",
        "## Splits",
        "",
        "Patient-level: no subject_id is in two splits. " + _split_source(meta),
        "",
        _table(("split", "records", "patients", "chunks", "target share"), split_rows),
        "",
        "## Not in the dataset",
        "",
        "Images that are not records, by rule (not dead letters):",
        "",
        _counts(meta.get("dropped", {})),
        "",
        "Records that failed (one line each in `failed/`, with ids, stage and reason):",
        "",
        _counts(meta.get("failed", {})),
        "",
        "## How it was made",
        "",
        f"Chunk format version {meta.get('format_version')}. Report: {report_line}.",
        "",
        _table(("provenance", "value"),
               sorted((k, v) for k, v in provenance.items() if k != "inputs")),
        *_inputs(provenance),
        "",
        _table(("package", "version"), sorted(meta.get("versions", {}).items())),
        "",
        _table(("setting", "value"), sorted(config.items())),
        "",
        "## How to load it",
        "",
        _LOAD,
        "",
        "## Files",
        "",
        "- `train/`, `val/`, `test/`: the chunks (`{split}-{index:05d}-of-{count:05d}.pt`).",
        "- `failed/`: the dead letters, one JSON line per failed record.",
        "- `stratification_indices.json`: every patient's split (reusable by a later run).",
        "- `report.html`, `report/`: the dataset report.",
        "- `metadata.json`: written last, its presence means the output is complete; every "
        "figure above comes from it, with each chunk's path, size and sha256.",
        "",
    ]
    return "\n".join(parts)


def write_card(output_dir: str, meta: Mapping[str, Any]) -> None:
    """Writes DATASET_CARD.md under `output_dir` (local or gs://), atomically."""
    storage.write_bytes(storage.join(output_dir, CARD_NAME), render_card(meta).encode())
