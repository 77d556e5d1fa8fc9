"""User-facing errors: bad configuration or input, reported as one clear line, no traceback."""


class InputError(ValueError):
    """Bad configuration, a missing table or a missing column. The message names the file,
    the column or the flag, and what is allowed."""
