"""vlq worker command (not yet written)."""
