"""vlq jobs command (not yet written)."""
