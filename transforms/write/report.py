"""The dataset report: `report.html` and its PNG plots under `report/`, beside metadata.json.

It is what a person opens first: headline numbers, the configuration and versions, and plots
of the split (records, strata, labels), clinical-feature missingness, note lengths and the
images and records lost by reason. `render_report` is a pure function of the metadata.json
document (and of the example records, if any), so the report is byte-identical across runs
like the rest of the output: PNGs carry no timestamp or software tag, at a fixed dpi.

Without examples the report holds aggregate counts only, never patient text. Example records
(an image thumbnail and the start of the note) are patient data from credentialed datasets:
they appear only when asked for (`--report_examples N`), read back from the first records of
each split's chunks (the chunk order is a hash of the seed and record id, so the choice is
deterministic and needs no extra shuffle).
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator
from PIL import Image

from transforms import storage
from transforms.chunks.format import chunk_len, decode_chunk, record_at
from transforms.splits import SPLITS as _SPLITS

REPORT_NAME = "report.html"
REPORT_DIR = "report"
_LOG = logging.getLogger(__name__)
EXCERPT_CHARS = 300
THUMBNAIL_SIZE = 256
_DPI = 100
_WIDTH_IN = 9.0
_COLOURS = {"train": "#3b6ea8", "val": "#e08a2e", "test": "#4c9a55"}
# Legends beside the axes: they never hide data, whatever the data.
_LEGEND_OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0.0}


@dataclasses.dataclass(frozen=True)
class Example:
    """One example record as the report shows it: patient data (see the module docstring)."""

    split: str
    record_id: str
    view_position: str
    positive_labels: tuple[str, ...]
    note_excerpt: str  # the first EXCERPT_CHARS characters of the enhanced note
    thumbnail: bytes  # PNG, at most THUMBNAIL_SIZE pixels a side


# --- examples ------------------------------------------------------------------------------

def _thumbnail(image: np.ndarray) -> bytes:
    picture = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))  # 2-D: greyscale
    picture.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _example(record: dict, label_names: Sequence[str]) -> Example:
    note = record["enhanced_note"]
    labels = record["labels"].tolist()
    return Example(
        split=record["split"],
        record_id=record["record_id"],
        view_position=record["view_position"],
        positive_labels=tuple(n for n, v in zip(label_names, labels) if v == 1.0),
        note_excerpt=note[:EXCERPT_CHARS] + ("…" if len(note) > EXCERPT_CHARS else ""),
        thumbnail=_thumbnail(record["image"].numpy()),
    )


def read_examples(output_dir: str, meta: Mapping[str, Any], per_split: int) -> list[Example]:
    """The first `per_split` records of each split, read back from its written chunks.

    Reads one chunk at a time, in index order, and only as many as it needs; 0 reads nothing.
    """
    examples: list[Example] = []
    if per_split <= 0:
        return examples
    for split in _SPLITS:
        taken = 0
        for entry in sorted((c for c in meta["chunks"] if c["split"] == split),
                            key=lambda c: c["index"]):
            if taken >= per_split:
                break
            chunk = decode_chunk(storage.read_bytes(storage.join(output_dir, entry["path"])))
            for i in range(min(chunk_len(chunk), per_split - taken)):
                examples.append(_example(record_at(chunk, i), meta["label_names"]))
                taken += 1
            del chunk
    return examples


# --- plots ---------------------------------------------------------------------------------

def _figure(height_in: float, ncols: int = 1) -> tuple[Figure, Any]:
    fig = Figure(figsize=(_WIDTH_IN, height_in), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    # No Software tag and no timestamp: the same figure gives the same bytes.
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return buffer.getvalue()


def _share(count: float, total: float) -> float:
    return count / total if total else 0.0


def _percent() -> FuncFormatter:
    """A tick format of shares as whole percents (a new one per axis: formatters are bound
    to their axis)."""
    return FuncFormatter(lambda value, _pos: f"{value:.0%}")


def _grouped_barh(ax, names: Sequence[str], values: Mapping[str, Sequence[float]]) -> None:
    """Horizontal bars, one group per name (top to bottom), one bar per split."""
    height = 0.8 / len(_SPLITS)
    ys = np.arange(len(names))
    for k, split in enumerate(_SPLITS):
        ax.barh(ys + (k - 1) * height, values[split], height, label=split,
                color=_COLOURS[split])
    ax.set_yticks(ys, names)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.xaxis.set_major_formatter(_percent())
    ax.grid(axis="x", alpha=0.3)
    ax.legend(**_LEGEND_OUTSIDE, title="split")


def plot_records(meta: Mapping[str, Any]) -> Figure:
    fig, ax = _figure(3.8)
    records = [meta["splits"][s]["records"] for s in _SPLITS]
    patients = [meta["splits"][s]["patients"] for s in _SPLITS]
    total = sum(records)
    xs = np.arange(len(_SPLITS))
    colours = [_COLOURS[s] for s in _SPLITS]
    bars = ax.bar(xs - 0.2, records, 0.4, color=colours)
    ax.bar_label(bars, [f"{n} ({_share(n, total):.1%})" for n in records], padding=2)
    bars = ax.bar(xs + 0.2, patients, 0.4, color=colours, alpha=0.45)
    ax.bar_label(bars, [str(n) for n in patients], padding=2)
    ax.set_xticks(xs, _SPLITS)
    ax.set_ylim(0, max(records + [1]) * 1.18)
    ax.set_ylabel("count")
    ax.set_title("Records (share of all records) and patients per split")
    ax.legend(handles=[Patch(color="#555555", label="records"),
                       Patch(color="#555555", alpha=0.45, label="patients")],
              loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_strata(meta: Mapping[str, Any]) -> Figure:
    splits = meta["splits"]
    strata = sorted({s for split in _SPLITS for s in splits[split]["strata"]})
    fig, ax = _figure(1.4 + 0.42 * max(len(strata), 1))
    values = {split: [_share(splits[split]["strata"].get(s, 0), splits[split]["records"])
                      for s in strata] for split in _SPLITS}
    _grouped_barh(ax, [s.replace("|", " | ") for s in strata], values)
    keys = " | ".join(meta.get("stratification", {}).get("keys", []))
    ax.set_xlabel("share of the split's records")
    ax.set_title(f"Strata per split ({keys})" if keys else "Strata per split")
    return fig


def plot_labels(meta: Mapping[str, Any]) -> Figure:
    splits = meta["splits"]
    names = list(meta["label_names"])
    fig, ax = _figure(1.4 + 0.42 * len(names))
    values = {split: [_share(splits[split]["labels"][n]["positive"], splits[split]["records"])
                      for n in names] for split in _SPLITS}
    _grouped_barh(ax, names, values)
    ax.set_xlabel("share of the split's records labelled positive (1.0)")
    ax.set_title("CheXpert label prevalence per split")
    return fig


def plot_missing(meta: Mapping[str, Any]) -> Figure:
    names = list(meta["feature_names"])
    matrix = np.array([[meta["splits"][s]["clinical_missing"][n] for s in _SPLITS]
                       for n in names], dtype=float).reshape(len(names), len(_SPLITS))
    fig, ax = _figure(1.6 + 0.32 * len(names))
    image = ax.imshow(matrix, aspect="auto", cmap="Reds", vmin=0.0, vmax=1.0)
    for (row, col), value in np.ndenumerate(matrix):
        ax.text(col, row, f"{value:.0%}", ha="center", va="center", fontsize=9,
                color="white" if value > 0.6 else "black")
    ax.set_xticks(range(len(_SPLITS)), _SPLITS)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(names)), names)
    fig.colorbar(image, ax=ax, label="share of the split's records missing it",
                 format=_percent(), fraction=0.05)
    ax.set_title("Clinical features: share missing (clinical_mask False)")
    return fig


def note_display_bins(
    notes: Mapping[str, Mapping[str, Any]], target: int = 40
) -> tuple[list[int], dict[str, list[int]]]:
    """Coarser bins for the plot: about `target` of them over the token range the notes
    occupy, each a whole number of metadata.json's bins. Returns (edges, counts by split)."""
    width = max(n["bin_width"] for n in notes.values())
    starts = [int(k) for n in notes.values() for k in n["counts"]]
    if not starts:
        return [0, width], {split: [0] for split in notes}
    low, high = min(starts), max(starts) + width
    step = width * max(1, math.ceil((high - low) / width / target))
    low = low // step * step
    edges = list(range(low, high + step, step))
    if edges[-2] >= high:
        edges.pop()
    counts = {split: [0] * (len(edges) - 1) for split in notes}
    for split, n in notes.items():
        for key, count in n["counts"].items():
            counts[split][(int(key) - low) // step] += count
    return edges, counts


def plot_note_tokens(meta: Mapping[str, Any]) -> Figure:
    fig, ax = _figure(4.8)
    splits = meta["splits"]
    edges, counts = note_display_bins({s: splits[s]["note_tokens"] for s in _SPLITS})
    for split in _SPLITS:
        notes, records = splits[split]["note_tokens"], splits[split]["records"]
        if records:
            ax.stairs([_share(n, records) for n in counts[split]], edges,
                      color=_COLOURS[split], linewidth=2,
                      label=f"{split} (mean {notes['mean']:.0f}, max {notes['max']})")
    limit = meta["config"].get("max_text_length")
    at_limit = sum(splits[s]["note_tokens"]["at_max_text_length"] for s in _SPLITS)
    if limit and edges[0] <= limit <= edges[-1]:
        ax.axvline(limit, color="#444444", linestyle="--", linewidth=1,
                   label=f"max_text_length {limit}")
    ax.yaxis.set_major_formatter(_percent())
    ax.set_xlabel(f"tokens per enhanced note (bins of {edges[1] - edges[0]} tokens)")
    ax.set_ylabel("share of the split's records")
    ax.set_title(f"Note length per split ({at_limit} of {meta['total_records']} notes cut at "
                 f"max_text_length {limit})" if limit else "Note length per split")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        fig.legend(loc="outside lower center", ncols=2)
    return fig


def plot_losses(meta: Mapping[str, Any]) -> Figure:
    panels = (
        ("dropped", "Images that are not records (dropped)"),
        ("failed", "Records that failed (listed in failed/)"),
    )
    rows = max(len(meta["dropped"]), len(meta["failed"]), 1)
    fig, axes = _figure(1.4 + 0.38 * rows, ncols=2)
    for ax, (key, title) in zip(axes, panels):
        reasons = list(meta[key])
        counts = [meta[key][r] for r in reasons]
        bars = ax.barh(range(len(reasons)), counts, color="#b5484b")
        ax.bar_label(bars, [str(n) for n in counts], padding=2)
        ax.set_yticks(range(len(reasons)), reasons)
        ax.set_ylim(rows - 0.5, -0.5)
        ax.set_xlim(0, max(counts + [1]) * 1.25)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        ax.set_xlabel("count")
        ax.set_title(title, fontsize=11)
    return fig


# (file name, title, caption, plot)
PLOTS: tuple[tuple[str, str, str, Callable[[Mapping[str, Any]], Figure]], ...] = (
    ("records_per_split.png", "Records and patients per split",
     "Patient-level split: no patient is in two splits.", plot_records),
    ("strata_per_split.png", "Strata per split",
     "Each stratum's share of the split's records; close shares mean a balanced split.",
     plot_strata),
    ("label_prevalence.png", "Label prevalence",
     "Share of each split's records whose CheXpert label is positive (1.0); negative, "
     "uncertain and missing labels are in metadata.json.", plot_labels),
    ("clinical_missing.png", "Clinical-feature missingness",
     "Share of each split's records where the feature is missing, unparsable or impossible "
     "(clinical_mask False).", plot_missing),
    ("note_tokens.png", "Note length",
     "Histogram of the enhanced note's token count over the range the notes occupy (from "
     "metadata.json's finer bins); notes over the token limit (max_text_length) were cut to it.",
     plot_note_tokens),
    ("losses_by_reason.png", "Losses by reason",
     "Images that never became records, and records that failed processing, by reason.",
     plot_losses),
)


# --- HTML ----------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 1.5em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.92em; }
.notice { padding: 0.6em 1em; border-radius: 4px; background: #eef4ea; }
.warning { padding: 0.6em 1em; border-radius: 4px; background: #fbe9e7;
           border: 2px solid #c62828; }
.tables { display: flex; flex-wrap: wrap; gap: 0 2em; align-items: flex-start; }
.example { display: flex; gap: 1em; align-items: flex-start; margin: 1em 0; }
.example img { flex: none; image-rendering: pixelated; border: 1px solid #ccc; }
.example pre { white-space: pre-wrap; margin: 0; font-size: 0.85em; max-width: 760px; }
code { font-size: 0.92em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1) -> str:
    def cell(tag: str, k: int, value: Any, key: str = "") -> str:
        cls = ' class="num"' if k >= numeric_from else ""
        data = f' data-key="{_e(key)}"' if key else ""
        return f"<{tag}{cls}{data}>{_e(value)}</{tag}>"

    head = "".join(cell("th", k, h) for k, h in enumerate(header))
    body = []
    for row in rows:
        key = row[0]
        body.append("<tr>" + "".join(
            cell("td", k, v, f"{key}.{header[k]}" if k else "") for k, v in enumerate(row)
        ) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _headline(meta: Mapping[str, Any]) -> str:
    splits = meta["splits"]
    chunks = {s: sum(1 for c in meta["chunks"] if c["split"] == s) for s in _SPLITS}
    total = meta["total_records"]
    rows = [
        (s, splits[s]["records"], f"{_share(splits[s]['records'], total):.1%}",
         splits[s]["patients"], chunks[s])
        for s in _SPLITS
    ]
    rows.append(("total", total, "100.0%" if total else "0.0%",
                 sum(splits[s]["patients"] for s in _SPLITS), len(meta["chunks"])))
    counts = _table(("split", "records", "share", "patients", "chunks"), rows)
    losses = _table(("what", "count"), [
        ("images dropped (not records)", sum(meta["dropped"].values())),
        ("records failed (dead letters)", sum(meta["failed"].values())),
    ])
    strat = meta.get("stratification", {})
    facts = _table(("fact", "value"), [
        ("image size (pixels, square)", meta["image_size"]),
        ("clinical features", len(meta["feature_names"])),
        ("labels", len(meta["label_names"])),
        ("chunk format version", meta["format_version"]),
        ("split seed", strat.get("seed", "")),
        ("split ratios (train, val, test)", ", ".join(
            f"{strat.get('ratios', {}).get(s, 0):g}" for s in _SPLITS)),
        ("reused stratification indices", "yes" if strat.get("reused_indices") else "no"),
        ("split source", meta.get("split_source", "stratified")),
    ], numeric_from=2)
    return f'<div class="tables">{counts}{losses}{facts}</div>'


def _examples_html(examples: Sequence[Example], names: Sequence[str]) -> str:
    parts = [
        '<h2 id="examples">Example records</h2>',
        '<p class="warning"><strong>Patient data.</strong> This section shows records from '
        "credentialed PhysioNet datasets (MIMIC-IV, MIMIC-IV-ED, MIMIC-CXR-JPG), because the "
        "run was given <code>--report_examples</code>. Share this report only with people "
        "covered by the data use agreement.</p>",
    ]
    for example, name in zip(examples, names):
        labels = ", ".join(example.positive_labels) or "none"
        parts.append(
            '<div class="example">'
            f'<img src="{REPORT_DIR}/{name}" alt="{_e(example.split)} example image" '
            'width="256">'
            f"<div><p><strong>{_e(example.split)}</strong> · record <code>"
            f"{_e(example.record_id)}</code> · view {_e(example.view_position)} · positive "
            f"labels: {_e(labels)}</p><pre>{_e(example.note_excerpt)}</pre></div></div>"
        )
    return "\n".join(parts)


def _example_names(examples: Sequence[Example]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for example in examples:
        k = seen.get(example.split, 0)
        seen[example.split] = k + 1
        names.append(f"example-{example.split}-{k}.png")
    return names


def render_report(
    meta: Mapping[str, Any], examples: Sequence[Example] = ()
) -> dict[str, bytes]:
    """The report's files, relative to the output dir: the PNGs under report/, then
    report.html (which links them by relative path). A pure function of its arguments."""
    files: dict[str, bytes] = {}
    figures = []
    for name, title, caption, plot in PLOTS:
        fig = plot(meta)
        files[f"{REPORT_DIR}/{name}"] = _png(fig)
        width, height = (int(round(v)) for v in fig.get_size_inches() * _DPI)
        figures.append(
            f'<figure id="{_e(name.removesuffix(".png"))}"><img src="{REPORT_DIR}/{_e(name)}" '
            f'alt="{_e(title)}" width="{width}" height="{height}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>"
        )
    example_names = _example_names(examples)
    for example, name in zip(examples, example_names):
        files[f"{REPORT_DIR}/{name}"] = example.thumbnail
    if examples:
        privacy = ('<p class="warning">This report contains example patient records '
                   '(<a href="#examples">below</a>): credentialed data.</p>')
    else:
        privacy = ('<p class="notice">Aggregate counts only: this report holds no patient '
                   "text or images (example records are shown only with "
                   "<code>--report_examples N</code>).</p>")
    config = _table(("setting", "value"),
                    [(k, _value(v)) for k, v in sorted(meta["config"].items())], numeric_from=2)
    versions = _table(("package", "version"), sorted(meta["versions"].items()), numeric_from=2)
    provenance = meta.get("provenance") or {}
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>Dataset report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>MIMIC multimodal dataset report</h1>",
        f"<p>{meta['total_records']} records in {len(meta['chunks'])} chunks. Every number "
        "here comes from <a href=\"metadata.json\">metadata.json</a>, which holds them all "
        "(and each chunk's path, size and sha256).</p>",
        privacy,
        '<h2 id="headline">Headline numbers</h2>',
        _headline(meta),
        '<h2 id="plots">Plots</h2>',
        *figures,
    ]
    if examples:
        body.append(_examples_html(examples, example_names))
    body += [
        '<h2 id="configuration">Configuration</h2>', config,
        '<h2 id="versions">Versions</h2>', versions,
    ]
    if provenance:
        body += ['<h2 id="provenance">Provenance</h2>', _table(
            ("item", "value"), [(k, _value(v)) for k, v in sorted(provenance.items())],
            numeric_from=2)]
    body.append("</body></html>")
    files[REPORT_NAME] = ("\n".join(body) + "\n").encode()
    return files


def write_report(output_dir: str, meta: Mapping[str, Any],
                 examples: Sequence[Example] = ()) -> None:
    """Writes `render_report`'s files under `output_dir` (local or gs://), report.html last,
    and removes any other file in report/ (an earlier run's examples must not linger)."""
    files = {storage.join(output_dir, *relpath.split("/")): data
             for relpath, data in render_report(meta, examples).items()}
    storage.delete(p for p in storage.list_files(storage.join(output_dir, REPORT_DIR, "*"))
                  if p not in files)
    for path, data in files.items():
        storage.write_bytes(path, data)


def publish_report(output_dir: str, meta: Mapping[str, Any], examples_per_split: int = 0
                   ) -> dict[str, Any]:
    """Reads the examples and writes the report; a failure costs the report, not the dataset.

    The report is a view of metadata.json: if rendering or writing it fails (a plotting bug,
    an unwritable report/), the run still commits. The failure is logged in one line and
    returned for metadata.json: its type and message with the output dir written as
    OUTPUT_DIR (so the manifest stays location-free), and no message at all when example
    records were asked for (the message could quote patient text).

    Returns:
        {} when the report is written; else {"report": None, "report_error": "..."}.
    """
    try:
        examples = read_examples(output_dir, meta, examples_per_split)
        write_report(output_dir, meta, examples)
    except Exception as err:  # noqa: BLE001 (any failure of an optional view, see above)
        detail = type(err).__name__
        if not examples_per_split:
            message = str(err).splitlines()[0] if str(err) else ""
            message = message.replace(output_dir, "OUTPUT_DIR")[:300]
            detail += f": {message}" if message else ""
        _LOG.error("report not written (%s); the dataset is complete without it", detail)
        try:  # a half-written report must not pass for a whole one
            storage.delete([storage.join(output_dir, REPORT_NAME)])
        except OSError:
            pass
        return {"report": None, "report_error": detail}
    return {}
