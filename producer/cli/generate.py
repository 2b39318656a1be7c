"""vlq generate command (not yet written)."""
