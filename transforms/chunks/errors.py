"""Errors of the chunk reader; each message names the file or directory at fault."""


class IncompleteOutputError(FileNotFoundError):
    """The output directory has no metadata.json: the pipeline has not finished writing it."""


class ChunkIntegrityError(ValueError):
    """A chunk file does not match its manifest entry (size, sha256, records) or is unreadable."""


class MissingChunkError(ChunkIntegrityError):
    """A chunk file listed in metadata.json does not exist."""
