"""User-facing errors: bad configuration or input, reported as one clear line, no traceback."""


class InputError(ValueError):
    """Bad configuration, a missing table or a missing column. The message names the file,
    the column or the flag, and what is allowed."""


class RunAborted(RuntimeError):
    """Raised inside the pipeline when the run must stop before it commits. The runner wraps it
    in its own error; the entry point prints its message as one line. Messages end with MARK."""

    MARK = "nothing was committed"


class TableValueError(InputError, RunAborted):
    """A bad value inside an input table, found while the pipeline reads it (one line, exit
    code 2, no commit)."""
