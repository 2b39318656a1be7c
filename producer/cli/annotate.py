"""vlq annotate command (not yet written)."""
