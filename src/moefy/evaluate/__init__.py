"""Evaluation: held-out perplexity per domain (and, later, harness tasks and speed)."""
