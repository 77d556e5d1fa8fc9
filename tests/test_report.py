"""The dataset report: its statistics, the render, the pipeline's commit and a real browser."""

from __future__ import annotations

import html
import html.parser
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from pipelines import build_dataset
from tests.chunk_fixtures import make_record, write_dataset
from tests.test_end_to_end import _argv, synthetic  # noqa: F401 (a fixture)
from transforms.write import report
from transforms.chunks.format import decode_chunk
from transforms.chunks.record import missing_features
from transforms.write.metadata import _SplitStatsFn, build_metadata, note_bin_width
from transforms.write.groups import RecordRef
from transforms.write.write_chunks import ChunkInfo
from transforms.splits import SPLITS, SplitAssignment

FEATURES = ("age", "heartrate", "o2sat")
MAX_TOKENS = 64
NAN = float("nan")


# --- statistics carried on the refs --------------------------------------------------------

@pytest.mark.parametrize("limit, width", [(8192, 8), (8193, 9), (1024, 1), (256, 1), (1, 1)])
def test_note_bins_are_at_most_1024_up_to_the_limit(limit: int, width: int) -> None:
    assert note_bin_width(limit) == width
    assert limit // width + 1 <= 1025


@pytest.mark.parametrize("notes, edges, counts", [
    ({"a": {"bin_width": 8, "counts": {"224": 3, "232": 1, "344": 2}},
      "b": {"bin_width": 8, "counts": {"80": 1}}},
     list(range(80, 360, 8)), {"a": (18, 3, 19, 1, 33, 2), "b": (0, 1)}),
    ({"a": {"bin_width": 1, "counts": {"0": 1, "999": 2}}},
     list(range(0, 1025, 25)), {"a": (0, 1, 39, 2)}),
    ({"a": {"bin_width": 1, "counts": {}}}, [0, 1], {"a": ()}),
])
def test_note_display_bins_cover_the_occupied_range_in_about_40_bins(notes, edges, counts):
    got_edges, got = report.note_display_bins(notes)
    assert got_edges == edges
    for split, pairs in counts.items():
        expected = [0] * (len(edges) - 1)
        for index, n in zip(pairs[::2], pairs[1::2]):
            expected[index] = n
        assert got[split] == expected


def test_missing_features_are_the_indices_the_mask_marks_false() -> None:
    assert missing_features([True, False, True, False]) == (1, 3)
    assert missing_features([]) == ()


def _ref(n: int, tokens: int, missing: tuple[int, ...], positive: bool) -> RecordRef:
    labels = (1.0 if positive else 0.0,) + (NAN,) * 13
    return RecordRef(f"r{n}", 100 + n // 2, n,
                     "AP|none|abnormal" if n % 2 else "PA|none|abnormal", labels,
                     note_tokens=tokens, clinical_missing=missing)


TOKENS = (0, 5, 64, 70, 12, 33, 8, 20, 40, 41, 50, 55)


def _refs() -> list[tuple[str, RecordRef]]:
    """12 records: 8 train, 2 val, 2 test; patient of record n is 100 + n // 2."""
    splits = ["train"] * 8 + ["val"] * 2 + ["test"] * 2
    return [(split, _ref(n, tokens=TOKENS[n], missing=(1,) if n % 4 == 0 else (),
                         positive=n % 3 == 0))
            for n, split in enumerate(splits)]


def _stats(elements) -> dict:
    fn = _SplitStatsFn(FEATURES, MAX_TOKENS)
    halves = []
    for part in (elements[::2], elements[1::2]):  # two bundles, merged
        acc = fn.create_accumulator()
        for element in part:
            acc = fn.add_input(acc, element)
        halves.append(acc)
    return fn.extract_output(fn.merge_accumulators(halves))


def test_split_stats_bin_note_tokens_and_count_missing_features() -> None:
    elements = _refs()
    stats = _stats(elements)
    train = stats["train"]
    assert sum(train["note_tokens"]["counts"].values()) == train["records"] == 8
    tokens = [ref.note_tokens for split, ref in elements if split == "train"]
    assert (train["note_tokens"]["min"], train["note_tokens"]["max"]) == (min(tokens),
                                                                         max(tokens))
    assert train["note_tokens"]["mean"] == round(sum(tokens) / 8, 2)
    # Bins of one token (64 tokens, at most 1024 bins); 70 (beyond the limit, never
    # produced) counts as cut at the limit, with 64.
    assert train["note_tokens"]["bin_width"] == 1
    assert train["note_tokens"]["counts"] == {"0": 1, "5": 1, "8": 1, "12": 1, "20": 1,
                                              "33": 1, "64": 2}
    assert train["note_tokens"]["at_max_text_length"] == 2

    assert train["clinical_missing"] == {"age": 0.0, "heartrate": 0.25, "o2sat": 0.0}
    assert stats["val"]["clinical_missing"]["heartrate"] == 0.5  # record 8 of 8, 9
    assert stats["test"]["note_tokens"]["mean"] == round((50 + 55) / 2, 2)
    assert stats == _stats(list(reversed(elements)))


def test_split_stats_reject_a_missing_feature_index_out_of_range() -> None:
    fn = _SplitStatsFn(FEATURES, MAX_TOKENS)
    with pytest.raises(ValueError, match="missing-feature indices"):
        fn.add_input(fn.create_accumulator(), ("train", _ref(0, 3, (3,), False)))


def make_meta(elements=None) -> dict:
    """A metadata.json document built the pipeline's way from `_refs()`."""
    elements = elements or _refs()
    stats = _stats(elements)
    chunks = [ChunkInfo(f"{s}/{s}-00000-of-00001.pt", s, 0, stats[s]["records"], 10, "0" * 64)
              for s in SPLITS]
    assignment = SplitAssignment({ref.subject_id: split for split, ref in elements}, 42,
                                 (0.7, 0.15, 0.15))
    meta = build_metadata(
        chunks=chunks, stats=stats, failed=[("image_truncated", 2)],
        dropped=[("not_frontal", 5), ("no_ed_stay", 1)], assignment=assignment,
        config={"max_text_length": MAX_TOKENS, "seed": 42, "views": ["AP", "PA"]},
        image_size=16, feature_names=FEATURES,
    )
    return json.loads(json.dumps(meta))  # as read back from the file


# --- the render ----------------------------------------------------------------------------

class _Page(html.parser.HTMLParser):
    """The <img> sources and the data-key cells of report.html."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.cells: dict[str, str] = {}
        self._key = None

    def handle_starttag(self, tag, attrs) -> None:
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        self._key = attrs.get("data-key")

    def handle_data(self, data) -> None:
        if self._key:
            self.cells[self._key] = data
            self._key = None


def parse(page: bytes) -> _Page:
    parser = _Page()
    parser.feed(page.decode())
    return parser


def test_render_draws_every_plot_and_the_page_links_each_png() -> None:
    files = report.render_report(make_meta())
    pngs = {name for name in files if name.endswith(".png")}
    assert pngs == {f"report/{name}" for name, *_ in report.PLOTS}
    assert list(files)[-1] == "report.html"
    for name in pngs:
        picture = Image.open(io.BytesIO(files[name]))
        assert picture.format == "PNG" and picture.width == 900 and picture.height > 200
        assert "Software" not in picture.info
    page = parse(files["report.html"])
    assert set(page.images) == pngs  # every img is a written PNG, every PNG is shown


def test_render_headline_numbers_are_metadata_numbers() -> None:
    meta = make_meta()
    cells = parse(report.render_report(meta)["report.html"]).cells
    for split in SPLITS:
        assert cells[f"{split}.records"] == str(meta["splits"][split]["records"])
        assert cells[f"{split}.patients"] == str(meta["splits"][split]["patients"])
    assert cells["total.records"] == str(meta["total_records"]) == "12"
    assert cells["total.chunks"] == "3"
    assert cells["images dropped (not records).count"] == "6"
    assert cells["records failed (dead letters).count"] == "2"
    assert cells["max_text_length.value"] == str(MAX_TOKENS)


def test_render_is_a_pure_function_of_the_metadata() -> None:
    assert report.render_report(make_meta()) == report.render_report(make_meta())


def _example(n: int, split: str, note: str) -> report.Example:
    record = make_record(n, split, image_size=300)
    record["enhanced_note"] = note
    return report._example(record, [f"label_{k}" for k in range(14)])


def test_an_example_is_a_thumbnail_and_the_start_of_the_note() -> None:
    note = "Chief complaint: " + "x" * 400
    example = _example(1, "val", note)
    assert example.note_excerpt == note[:report.EXCERPT_CHARS] + "…"
    assert _example(1, "val", "short").note_excerpt == "short"
    assert Image.open(io.BytesIO(example.thumbnail)).size == (report.THUMBNAIL_SIZE,) * 2
    # make_record's labels: (n + k) % 4 - 1 == 1.0 at k = 1 (n = 1), NaN-free otherwise.
    assert example.positive_labels == ("label_1", "label_5", "label_9", "label_13")


def test_patient_text_only_with_examples() -> None:
    meta = make_meta()
    note = "Demographics: 58-year-old female; chief complaint: chest pain."
    examples = [_example(n, split, f"{note} #{n}") for n, split in enumerate(SPLITS)]
    plain = report.render_report(meta)["report.html"].decode()
    assert note not in plain and "example" not in " ".join(parse(plain.encode()).images)
    assert "no patient text" in plain
    shown = report.render_report(meta, examples)
    page = shown["report.html"].decode()
    assert all(f"{note} #{n}" in page for n in range(3))
    assert "Patient data." in page and "data use agreement" in page
    thumbs = [f"report/example-{split}-0.png" for split in SPLITS]
    assert [src for src in parse(shown["report.html"]).images if "example" in src] == thumbs
    assert all(shown[name] == e.thumbnail for name, e in zip(thumbs, examples))


def test_examples_are_the_first_records_of_each_split_in_chunk_order(tmp_path) -> None:
    meta = write_dataset(tmp_path, {"train": 5, "val": 3, "test": 1}, chunk_size=2)
    examples = report.read_examples(str(tmp_path), meta, 3)
    assert [(e.split, e.record_id) for e in examples] == [
        ("train", "dicom-00000"), ("train", "dicom-00001"), ("train", "dicom-00002"),
        ("val", "dicom-00005"), ("val", "dicom-00006"), ("val", "dicom-00007"),
        ("test", "dicom-00008"),
    ]
    assert examples[2].note_excerpt == "note of record 2"
    # 0 reads nothing at all: not even a chunk that is not there.
    assert report.read_examples(str(tmp_path / "nowhere"), meta, 0) == []


def test_write_report_replaces_an_earlier_reports_examples(tmp_path) -> None:
    meta = make_meta()
    report.write_report(str(tmp_path), meta, [_example(0, "train", "a note")])
    assert (tmp_path / "report" / "example-train-0.png").exists()
    report.write_report(str(tmp_path), meta)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(
        name for name, *_ in report.PLOTS)
    assert "a note" not in (tmp_path / "report.html").read_text()


# --- the pipeline --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(synthetic, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("out") / "dataset"
    build_dataset.run(_argv(synthetic, out, "--report_examples", "1", "--runner",
                            "DirectRunner", "--direct_running_mode", "in_memory",
                            "--direct_num_workers", "1"))
    return out


def _notes(out: Path, meta: dict) -> dict[str, str]:
    notes = {}
    for entry in meta["chunks"]:
        chunk = decode_chunk((out / entry["path"]).read_bytes())
        notes.update(zip(chunk["record_id"], chunk["enhanced_note"]))
    return notes


def test_pipeline_writes_the_report_before_metadata(built: Path) -> None:
    meta = json.loads((built / "metadata.json").read_text())
    page = (built / "report.html").read_bytes()
    assert (built / "report.html").stat().st_mtime_ns <= (built / "metadata.json").stat(
    ).st_mtime_ns
    assert meta["report"] == "report.html" and meta["config"]["report_examples"] == 1
    parsed = parse(page)
    assert all((built / src).is_file() for src in parsed.images)
    assert {p.relative_to(built).as_posix() for p in (built / "report").iterdir()} == set(
        parsed.images)
    for split in SPLITS:
        assert parsed.cells[f"{split}.records"] == str(meta[f"n_{split}"])
        assert parsed.cells[f"{split}.patients"] == str(meta["splits"][split]["patients"])
        notes = meta["splits"][split]["note_tokens"]
        assert sum(notes["counts"].values()) == meta[f"n_{split}"]
        assert 0 <= notes["at_max_text_length"] <= meta[f"n_{split}"]
        assert notes["max"] <= meta["config"]["max_text_length"]
        assert set(meta["splits"][split]["clinical_missing"]) == set(meta["feature_names"])
    assert parsed.cells["total.records"] == str(meta["total_records"])
    assert parsed.cells["records failed (dead letters).count"] == str(
        sum(meta["failed"].values()))


def test_pipeline_report_shows_only_the_chosen_examples(built: Path) -> None:
    meta = json.loads((built / "metadata.json").read_text())
    page = (built / "report.html").read_text()
    notes = _notes(built, meta)
    firsts = {}
    for entry in meta["chunks"]:
        if entry["index"] == 0:
            firsts[entry["split"]] = decode_chunk((built / entry["path"]).read_bytes())[
                "record_id"][0]
    assert len(firsts) == 3
    # Images of one study share their note, so an excerpt may belong to a record not shown.
    shown_excerpts = {notes[rid][:report.EXCERPT_CHARS] for rid in firsts.values()}
    for record_id, note in notes.items():
        assert (record_id in page) == (record_id in firsts.values())
        excerpt = note[:report.EXCERPT_CHARS]
        assert (html.escape(excerpt) in page) == (excerpt in shown_excerpts)
    # The same output without --report_examples: no note, no record id anywhere on the page.
    plain = report.render_report(meta)["report.html"].decode()
    assert not any(rid in plain or note[:40] in plain for rid, note in notes.items())


# --- a real browser ------------------------------------------------------------------------

_CHECK_IMAGES = """<script>
window.addEventListener("load", () => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0);
  document.body.dataset.images = document.images.length;
  document.body.dataset.broken = broken.map(i => i.getAttribute("src")).join(" ");
});
</script></body>"""


@pytest.fixture
def browser() -> str:
    """The chromium executable; skips (or fails with REQUIRE_BROWSER=1) without one."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("REQUIRE_BROWSER") == "1":
        pytest.fail("REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium); set REQUIRE_BROWSER=1 "
                "to fail instead of skipping")


def _browse(browser: str, page: Path, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={profile}", "--virtual-time-budget=5000", *flags, page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_the_report_renders_in_a_browser_with_every_image_loaded(browser: str, built: Path,
                                                                  tmp_path) -> None:
    # A copy of the page with a probe that records which images failed to load, beside the
    # same report/ folder (relative links), so the output itself carries no script.
    site = tmp_path / "site"
    shutil.copytree(built / "report", site / "report")
    page = (built / "report.html").read_text()
    (site / "report.html").write_text(page)
    (site / "probe.html").write_text(page.replace("</body>", _CHECK_IMAGES))
    dom = _browse(browser, site / "probe.html", tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = dom.stdout[dom.stdout.index("<body"):].split(">", 1)[0]
    n_images = len(parse(page.encode()).images)
    assert f'data-images="{n_images}"' in body and 'data-broken=""' in body, body

    shot = tmp_path / "report.png"
    taken = _browse(browser, site / "report.html", tmp_path / "profile",
                    f"--screenshot={shot}", "--window-size=1200,2400")
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    picture = Image.open(shot).convert("RGB")
    assert picture.size == (1200, 2400)
    colours = picture.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, tables and plots, not a blank page
    background = max(colours)[0] / (1200 * 2400)
    assert background < 0.95


def test_the_flag_is_in_help_off_by_default_and_checked() -> None:
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.config import config_from_options
    from transforms.errors import InputError

    text = " ".join(build_dataset.help_text().split())
    assert "--report_examples REPORT_EXAMPLES" in text and "credentialed" in text
    described = text.rsplit("--report_examples REPORT_EXAMPLES", 1)[1].split(" --", 1)[0]
    assert "credentialed" in described and "counts only. (default: 0)" in described
    assert config_from_options(PipelineOptions([])).report_examples == 0
    with pytest.raises(InputError, match="--report_examples must be >= 0"):
        config_from_options(PipelineOptions(["--report_examples", "-1"]))
