"""vlq api command (not yet written)."""
