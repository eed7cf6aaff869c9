"""Data: corpus reading and tokenisation, the built-in demo corpus and probe texts, and the training-data filter
(fluency, advertisements) with its report."""
