"""Phase 1 as one Beam pipeline: read and join the tables, preprocess text and images on the
workers, split patients in a side-input pass, and write fixed-size chunks with a manifest.

    python -m pipelines.build_dataset --mimic_iv_dir ... --mimic_ed_dir ... \
        --mimic_cxr_dir ... --output_dir gs://bucket/dataset

With no input dirs it generates a small synthetic MIMIC-shaped dataset and runs on it (the
demo). `--help` lists every flag.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipelines import cli
from pipelines.local_runner import apply_runner_defaults, is_local
from pipelines.malloc import limit_malloc_arenas
from pipelines.config import DatasetConfig, DatasetOptions, config_from_options
from transforms.write import dataset_card
from transforms.join import schema
from transforms import storage
from transforms.join.cohort import JOIN_TABLES, RECORDS_TAG, JoinCohort
from transforms.errors import InputError, RunAborted, TableValueError
from transforms.images import ImageSettings
from transforms.text.notes import check_text_config
from transforms.progress import Progress
from transforms.ledger import LEDGER_TAG, ConservationError, SumLedger
from transforms.records import DEAD_LETTER_TAG, DROPPED_TAG
from transforms.splits import INDICES_NAME, OFFICIAL, SplitAssignment, SplitPatients
from transforms.splits import WriteIndices, read_indices
from transforms.join.tables import ReadTables, check_image_root, check_tables, table_path
from transforms.write.metadata import WriteMetadata, check_output_dir
from transforms.write import provenance as provenance_of
from transforms.write.groups import GROUPS_TAG, REFS_TAG, REUSED, PreprocessGroups
from transforms.write.resume import run_fingerprint
from transforms.write.write_chunks import WriteChunks

SYNTHETIC_DIR_SUFFIX = "_synthetic_mimic"


def input_roots(cfg: DatasetConfig) -> dict[str, str]:
    return {
        schema.MIMIC_IV: cfg.mimic_iv_dir,
        schema.MIMIC_ED: cfg.mimic_ed_dir,
        schema.MIMIC_CXR: cfg.mimic_cxr_dir,
    }


def split_tables(cfg: DatasetConfig) -> tuple[str, ...]:
    """The tables the split reads: the official split table with --split official."""
    return ("split",) if cfg.split == OFFICIAL else ()


def build_pipeline(
    p: beam.Pipeline, cfg: DatasetConfig, indices: Optional[SplitAssignment] = None,
    provenance: Optional[dict] = None,
) -> None:
    """Adds every stage of Phase 1 to `p`. Inputs must already have passed check_tables.

    Only small metadata crosses the join's shuffle and the split's side input; text and
    images are produced and written as chunks within one group's processing, so memory is
    bounded by a group.

    Args:
        provenance: `transforms.write.provenance.collect()` for cfg's text settings (None:
            collected here).
    """
    # The metadata is read first; JoinCohort reads the other tables itself, keeping only the
    # rows of patients with a frontal image. The split table goes to the split's analyze pass.
    tables = p | "ReadTables" >> ReadTables(
        input_roots(cfg), names=("metadata", *split_tables(cfg)),
        user_project=cfg.requester_pays_project,
    )
    cohort = tables | "JoinCohort" >> JoinCohort(
        image_root=image_root(cfg),
        views=cfg.views,
        aggressive_filtering=cfg.aggressive_filtering,
        limit=cfg.limit,
        seed=cfg.seed,
        roots=input_roots(cfg),
        user_project=cfg.requester_pays_project,
    )
    records = cohort[RECORDS_TAG]
    assignment = records | "SplitPatients" >> SplitPatients(
        cfg.ratios, cfg.seed, indices, table=tables.get("split"))
    if cfg.compute_indices_only:
        ledger = (tables[LEDGER_TAG], cohort[LEDGER_TAG]) | "Ledger" >> SumLedger()
        assignment | "WriteIndices" >> WriteIndices(
            storage.join(cfg.output_dir, INDICES_NAME), beam.pvalue.AsDict(ledger), JOIN_TABLES)
        return

    if provenance is None:
        provenance = collect_provenance(cfg)
    progress = Progress()
    record_count = records | "CountRecords" >> beam.combiners.Count.Globally()
    written = (
        records | "NoteTotal" >> progress.total(record_count), assignment
    ) | "PreprocessGroups" >> PreprocessGroups(
        cfg.output_dir, cfg.chunk_size, cfg.seed, run_fingerprint(cfg.summary(), provenance),
        text=(cfg.embedding_model, cfg.knowledge_base, cfg.tokenizer, cfg.max_text_length,
              cfg.retrieval_top_k),
        images=ImageSettings(
            size=cfg.image_size,
            clahe=cfg.clahe_clip_limit > 0,
            clip_limit=cfg.clahe_clip_limit or 2.0,
            tile_grid=cfg.clahe_tile_grid,
            requester_pays_project=cfg.requester_pays_project or None,
        ),
    )
    refs = written[REFS_TAG] | "LogProgress" >> progress.log()
    chunks = written[GROUPS_TAG] | "WriteChunks" >> WriteChunks(cfg.output_dir, cfg.chunk_size)
    dead_letters = (
        cohort[DEAD_LETTER_TAG], written[DEAD_LETTER_TAG]
    ) | "FlattenDeadLetters" >> beam.Flatten()
    ledger = (
        tables[LEDGER_TAG], cohort[LEDGER_TAG], written[LEDGER_TAG],
    ) | "Ledger" >> SumLedger()
    _ = {
        "chunks": chunks,
        "refs": refs,
        "assignment": assignment,
        "dead_letters": dead_letters,
        "dropped": cohort[DROPPED_TAG],
        "ledger": ledger,
        "images": written[GROUPS_TAG] | "GroupImages" >> beam.Map(lambda g: g.images),
    } | "WriteMetadata" >> WriteMetadata(
        cfg.output_dir, cfg.summary(), image_size=cfg.image_size,
        report_examples=cfg.report_examples, tables=JOIN_TABLES,
        max_failed_fraction=cfg.max_failed_fraction, provenance=provenance,
    )


def collect_provenance(cfg: DatasetConfig) -> dict:
    """metadata.json's versions and digests: cfg's text settings (reads the model once) and
    every input table read (path, bytes, checksum)."""
    tables = {name: table_path(schema.TABLES[name], input_roots(cfg))
              for name in schema.INPUT_TABLES + split_tables(cfg)}
    return provenance_of.collect(
        cfg.embedding_model, cfg.knowledge_base, cfg.tokenizer,
        tables=provenance_of.input_tables(tables, cfg.requester_pays_project))


def image_root(cfg: DatasetConfig) -> str:
    return cfg.cxr_image_root or cfg.mimic_cxr_dir


def _synthetic_inputs(cfg: DatasetConfig) -> DatasetConfig:
    """The demo: generates MIMIC-shaped data beside the output (once; reused when present)."""
    from synthetic.mimic import generate

    folder = cfg.output_dir + SYNTHETIC_DIR_SUFFIX
    stamp = storage.join(folder, "generated.json")
    params = {
        "n_patients": cfg.synthetic_patients,
        "seed": cfg.seed,
        "image_height": cfg.synthetic_image_height,
        "image_width": cfg.synthetic_image_width,
        # One broken file of each kind per 400 patients: the demo shows dead letters while
        # staying under the default --max_failed_fraction.
        "faults": cfg.synthetic_patients // 400,
        # One patient per 100 missing from the split table: --split official shows its rule.
        "split_missing": cfg.synthetic_patients // 100,
    }
    data = None
    if storage.exists(stamp):
        saved = json.loads(storage.read_bytes(stamp))
        if saved.get("params") == params:
            data = saved["roots"]
    if data is None:
        logging.info("generating synthetic MIMIC data (%d patients) in %s",
                     cfg.synthetic_patients, folder)
        generated = generate(folder, **params)
        data = {
            "mimic_iv_dir": generated.mimic_iv_dir,
            "mimic_ed_dir": generated.mimic_ed_dir,
            "mimic_cxr_dir": generated.mimic_cxr_dir,
        }
        storage.write_bytes(stamp, json.dumps({"params": params, "roots": data}).encode())
    return dataclasses.replace(cfg, **data)


def help_text() -> str:
    """Every flag of the pipeline with its default, then where Beam's runner flags are."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m pipelines.build_dataset",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Beam's own flags also apply, e.g. --runner (default DirectRunner, with "
        "--direct_running_mode multi_threading --direct_num_workers 2), --project, "
        "--region, --temp_location, --setup_file (see run_dataflow.sh).",
    )
    DatasetOptions._add_argparse_args(parser)
    return parser.format_help()


def run(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    """Runs Phase 1. Returns metadata.json's content once a local run completes (None for a
    submitted remote job). Raises InputError, before any work, on bad flags (an unknown one
    too: Beam would only log it and run) or inputs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return None
    cli.check_flags(argv)
    if "--version" in argv:
        print(cli.version_text())
        return None
    options = PipelineOptions(argv)
    cfg = config_from_options(options)
    apply_runner_defaults(options, argv)
    # Every check once, before any work; the transforms receive the checked values and do not
    # check them again. The read-only checks of the text settings come before the demo's data
    # generation, the clearing of an old output (--overwrite) after every other check.
    indices = None
    if not cfg.compute_indices_only:
        check_text_config(cfg.embedding_model, cfg.knowledge_base, cfg.tokenizer)
        if cfg.stratification_indices:
            indices = read_indices(cfg.stratification_indices)
    if cfg.synthetic:
        cfg = _synthetic_inputs(cfg)
    roots = input_roots(cfg)
    check_tables(roots, schema.INPUT_TABLES + split_tables(cfg),
                 user_project=cfg.requester_pays_project)
    provenance = None
    if not cfg.compute_indices_only:
        check_image_root(roots, image_root(cfg), cfg.views, cfg.requester_pays_project)
        provenance = collect_provenance(cfg)
        check_output_dir(cfg.output_dir, cfg.overwrite,
                         run_fingerprint(cfg.summary(), provenance))

    storage.make_root(cfg.output_dir, cfg.output_permissions)  # what the run writes inherits it
    started = time.monotonic()
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, cfg, indices, provenance)
    result = pipeline.run()
    if not is_local(options):
        logging.info("submitted the pipeline to %s", options.view_as(StandardOptions).runner)
        return None
    result.wait_until_finish()
    elapsed = time.monotonic() - started
    if storage.retry_summary():  # this process's calls (the DirectRunner's threads)
        logging.info(storage.retry_summary())
    if cfg.compute_indices_only:
        print(f"wrote {storage.join(cfg.output_dir, INDICES_NAME)} in {elapsed:.1f} s")
        print(counters_text(result))
        return None
    metadata = json.loads(storage.read_bytes(storage.join(cfg.output_dir, "metadata.json")))
    print(summary_text(metadata, cfg.output_dir, elapsed,
                       reused=(counter_totals(result) or {}).get(REUSED)))
    print(counters_text(result))
    return metadata


def counter_totals(result: beam.runners.runner.PipelineResult) -> Optional[dict[str, int]]:
    """The run's Beam counters by "namespace/name" (None where the runner has none)."""
    try:
        counters = result.metrics().query()["counters"]
    except (AttributeError, NotImplementedError, KeyError):
        return None
    totals: dict[str, int] = {}
    for counter in counters:
        name = f"{counter.key.metric.namespace}/{counter.key.metric.name}"
        totals[name] = totals.get(name, 0) + (counter.committed or 0)
    return totals


def counters_text(result: beam.runners.runner.PipelineResult) -> str:
    """The run's Beam counters (the same figures Dataflow shows as job metrics)."""
    totals = counter_totals(result)
    if totals is None:
        return "counters: not available from this runner"
    return "counters:\n" + "\n".join(f"  {k} = {v}" for k, v in sorted(totals.items()))


def summary_text(metadata: dict, output_dir: str, elapsed: float,
                 reused: Optional[int] = None) -> str:
    """The short summary printed at the end of a local run (counts only, no patient data).

    Args:
        reused: records taken from an interrupted run's finished groups (not preprocessed).
    """
    total = metadata["total_records"]
    lines = [
        f"wrote {total} records to {output_dir} in {elapsed:.1f} s "
        f"({total / max(elapsed, 1e-9):.1f} records/s)",
        *([f"  resumed: {reused} of {total} records reused from the interrupted run"]
          if reused else []),
        f"  train {metadata['n_train']}, val {metadata['n_val']}, test {metadata['n_test']}; "
        f"{len(metadata['chunks'])} chunks",
        "  not records: " + (", ".join(
            f"{reason} {n}" for reason, n in sorted(metadata["dropped"].items()) if n) or "none"),
        "  failed: " + (", ".join(
            f"{reason} {n}" for reason, n in sorted(metadata["failed"].items()) if n) or "none"),
        "  report: " + (storage.join(output_dir, metadata["report"]) if metadata.get("report")
                        else f"not written ({metadata.get('report_error')})"),
        "  dataset card: " + storage.join(output_dir, dataset_card.CARD_NAME),
    ]
    return "\n".join(lines)


def main() -> None:
    limit_malloc_arenas()  # before the runner starts its worker threads
    try:
        cli.configure_logging(cli.log_level(sys.argv[1:]))
        for handler in logging.getLogger().handlers:
            handler.addFilter(_NoAbortTraceback())
        sys.stderr = _StderrWithoutAbortTraceback(sys.stderr)
        run()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # noqa: BLE001: the runner wraps the failing step's error
        aborted = aborted_line(err)
        if aborted is None:
            raise
        line, code = aborted
        print(f"error: {line}", file=sys.stderr)
        sys.exit(code)


# Errors raised inside the pipeline that stop the run before it commits, with their exit codes.
_ABORTS = {TableValueError: 2, ConservationError: 1}


def aborted_line(err: BaseException) -> Optional[tuple[str, int]]:
    """The one-line message and exit code of a RunAborted raised inside the pipeline, which the
    local runner re-raises wrapped in its own error with the worker's traceback; None for
    others."""
    for kind, code in _ABORTS.items():
        if isinstance(err, kind):
            return str(err), code
    for line in reversed(str(err).splitlines()):
        for kind, code in _ABORTS.items():
            marker = kind.__name__ + ": "
            if marker in line:
                return line.split(marker, 1)[1].split(" [while running")[0].strip(), code
    return None


class _NoAbortTraceback(logging.Filter):
    """The runner logs a failed step's traceback before re-raising it; for a RunAborted the one
    line printed by main() says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, RunAborted) or RunAborted.MARK in record.getMessage())


class _StderrWithoutAbortTraceback:
    """sys.stderr, less the tracebacks of a RunAborted that Beam's SDK worker prints there
    itself (sdk_worker.py `print(traceback_string, file=sys.stderr)`)."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._dropped = False  # print() writes the newline after the traceback on its own

    def write(self, text: str) -> int:
        dropped, self._dropped = self._dropped, "Traceback" in text and RunAborted.MARK in text
        if self._dropped or (dropped and text == "\n"):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


if __name__ == "__main__":
    main()
