"""Stage 5: spill records, write chunks, commit metadata and the report."""
