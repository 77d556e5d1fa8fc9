"""MIMIC -> multimodal training chunks: the pipeline's stages and the chunk format."""

# The project's version: setup.py, `--version` and metadata.json's provenance read it here.
__version__ = "0.1.0"
