"""Stage 3: the clinical features and the enhanced note."""
