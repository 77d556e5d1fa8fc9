"""Development tools: synthetic MIMIC-shaped inputs (never needed by a real run)."""
