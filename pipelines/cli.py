"""The command line's strictness and its quiet log, shared by build_dataset and run_dataflow.sh.

Beam parses its own flags with `parse_known_args` and only logs "Discarding unparseable args"
for the rest, so a mistyped `--chunksize 10` would run with the default chunk size. Here every
argument is checked, before any work, against the flags Beam itself would parse: those of
every registered `PipelineOptions` subclass (Beam's runner, Google Cloud, worker, setup, ...
options and `DatasetOptions`). An unknown flag raises `InputError` naming it and the nearest
known one.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import warnings
from typing import Iterable, Optional, Sequence

from apache_beam.options.pipeline_options import PipelineOptions

import transforms
# DatasetOptions is imported for its side effect too: it registers the pipeline's flags as a
# PipelineOptions subclass, so that the check knows them.
from pipelines.config import DEFAULT_LOG_LEVEL, LOG_LEVELS, DatasetOptions  # noqa: F401
from transforms.errors import InputError
from transforms.write.provenance import PROJECT_DISTRIBUTION

# Loggers of libraries whose progress and warnings are not the run's story (model loading
# bars, font-cache notes); their errors still show.
_QUIET_LOGGERS = ("matplotlib", "PIL", "transformers", "sentence_transformers",
                  "huggingface_hub", "filelock", "urllib3", "google.auth")
_QUIET_MODULES = r"(matplotlib|transformers|sentence_transformers|huggingface_hub|torch)(\.|$)"


def version_text() -> str:
    """What `--version` prints."""
    return f"{PROJECT_DISTRIBUTION} {transforms.__version__}"


def _pipeline_parser() -> argparse.ArgumentParser:
    """A parser with every flag of every registered PipelineOptions subclass, built the way
    `PipelineOptions.get_all_options` builds Beam's own: its parser class (some options use
    its `add_value_provider_argument`), no abbreviations, one definition per class."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    class _Parser(_BeamArgumentParser):
        def error(self, message: str):  # one line, not argparse's usage and SystemExit
            raise InputError(message)

    parser = _Parser(allow_abbrev=False)
    subset: dict[str, type] = {}
    for cls in PipelineOptions.__subclasses__():
        subset.setdefault(str(cls), cls)
    for cls in subset.values():
        cls._add_argparse_args(parser)  # noqa: SLF001 (Beam's own extension point)
    return parser


def known_flags() -> list[str]:
    """Every flag the pipeline accepts (Beam's and ours), sorted."""
    parser = _pipeline_parser()
    return sorted({s for action in parser._actions for s in action.option_strings})


def _nearest(flag: str, candidates: Iterable[str]) -> Optional[str]:
    close = difflib.get_close_matches(flag, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_flag_message(flag: str, candidates: Iterable[str]) -> str:
    """"unknown flag --chunksize (did you mean --chunk_size?)"."""
    nearest = _nearest(flag, candidates)
    return f"unknown flag {flag}" + (f" (did you mean {nearest}?)" if nearest else "")


def check_flags(argv: Sequence[str], *, also_known: Sequence[str] = ()) -> None:
    """Raises InputError, naming them, if `argv` holds flags no PipelineOptions class knows,
    or stray values that belong to no flag.

    Args:
        argv: the pipeline's arguments (no program name).
        also_known: more flags to suggest as the nearest (e.g. the launcher's own).
    """
    parser = _pipeline_parser()
    _, unknown = parser.parse_known_args(list(argv))
    if not unknown:
        return
    known = {s for action in parser._actions for s in action.option_strings}
    flags = [arg.split("=", 1)[0] for arg in unknown if arg.startswith("-") and arg != "--"]
    if flags:
        candidates = sorted(known | set(also_known))
        raise InputError(", ".join(unknown_flag_message(f, candidates) for f in flags))
    raise InputError(f"unexpected argument {unknown[0]!r}: every value follows its --flag")


def log_level(argv: Sequence[str]) -> int:
    """The `--log_level` in `argv` (default INFO) as a logging level.

    Raises:
        InputError: a level other than DEBUG, INFO, WARNING, ERROR.
    """
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    parser.add_argument("--log_level", default=DEFAULT_LOG_LEVEL)
    args, _ = parser.parse_known_args(list(argv))
    name = str(args.log_level).upper()
    if name not in LOG_LEVELS:
        raise InputError(f"--log_level must be one of {', '.join(LOG_LEVELS)}, got "
                         f"{args.log_level!r}")
    return getattr(logging, name)


def quiet_third_party() -> None:
    """Keeps third-party progress bars and chatter out of the run's log: the transformers
    "Loading weights" bar, Hugging Face warnings and matplotlib's font-cache notes.

    Environment variables first, so that libraries imported later (and worker processes this
    one starts) read them; the loggers and warning filters for this process.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=_QUIET_MODULES)


def configure_logging(level: int) -> None:
    """The launcher's log: timestamps at `level`, Beam's own INFO chatter off, and quiet
    third-party libraries (see `quiet_third_party`)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger().setLevel(level)
    # Beam's INFO lines (stage fusion, bundle sizes) only when debugging.
    logging.getLogger("apache_beam").setLevel(
        logging.INFO if level <= logging.DEBUG else max(level, logging.WARNING))
    quiet_third_party()
