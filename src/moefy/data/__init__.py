"""Built-in data: the probe texts used by verify (and, later, the demo corpus and filters)."""
