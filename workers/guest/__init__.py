"""NovaCron test guest (placeholder docstring, being written)."""
