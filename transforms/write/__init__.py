"""Stages 3-5: preprocess and write each group once, lay out the chunks, commit metadata and the
report."""
