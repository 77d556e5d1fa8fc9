"""Phase 1 as one Beam pipeline: read and join the tables, preprocess text and images on the
workers, split patients in a side-input pass, and write fixed-size chunks with a manifest.

    python -m pipelines.build_dataset --mimic_iv_dir ... --mimic_ed_dir ... \
        --mimic_cxr_dir ... --output_dir gs://bucket/dataset

With no input dirs it generates a small synthetic MIMIC-shaped dataset and runs on it (the
demo). `--help` lists every flag.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
)

from pipelines.options import DatasetConfig, DatasetOptions, config_from_options
from transforms import fileio, schema
from transforms.errors import InputError

SYNTHETIC_DIR_SUFFIX = "_synthetic_mimic"


def input_roots(cfg: DatasetConfig) -> dict[str, str]:
    return {
        schema.MIMIC_IV: cfg.mimic_iv_dir,
        schema.MIMIC_ED: cfg.mimic_ed_dir,
        schema.MIMIC_CXR: cfg.mimic_cxr_dir,
    }


def build_pipeline(p: beam.Pipeline, cfg: DatasetConfig) -> None:
    """Adds every stage of Phase 1 to `p` (inputs must already pass check_tables)."""
    from transforms.cohort import JoinCohort
    from transforms.images import PreprocessImages
    from transforms.notes import BuildNotes
    from transforms.records import sample_from
    from transforms.splits import SplitPatients
    from transforms.tables import ReadTables
    from transforms.write_chunks import SpillSamples, WriteChunks, WriteMetadata

    tables = p | "ReadTables" >> ReadTables(input_roots(cfg))
    cohort = tables | "JoinCohort" >> JoinCohort(
        views=cfg.views,
        aggressive_filtering=cfg.aggressive_filtering,
        image_root=cfg.cxr_image_root or cfg.mimic_cxr_dir,
    )
    raise NotImplementedError  # wired once the stages land


def _runner_defaults(options: PipelineOptions) -> None:
    """Local runs default to the DirectRunner with two worker threads (OpenCV and torch
    release the GIL, so threads beat processes for image work and share one model)."""
    standard = options.view_as(StandardOptions)
    if standard.runner is None:
        standard.runner = "DirectRunner"
    direct = options.view_as(DirectOptions)
    if standard.runner in ("DirectRunner", "FnApiRunner", "SwitchingDirectRunner"):
        if direct.direct_running_mode == "in_memory" and "--direct_running_mode" not in str(
            options.get_all_options(drop_default=True)
        ):
            direct.direct_running_mode = "multi_threading"
        if direct.direct_num_workers == 1:
            direct.direct_num_workers = 2


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Runs the pipeline; returns the summary of metadata.json. Raises InputError early."""
    raise NotImplementedError


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    try:
        run()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
