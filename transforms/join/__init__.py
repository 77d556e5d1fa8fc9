"""Stage 1: read the tables and join the cohort by patient."""
