"""Evaluation: several models compared on one corpus (compare), lm-eval tasks (harness), speed (speed)."""
