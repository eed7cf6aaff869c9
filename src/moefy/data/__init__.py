"""Data: corpus reading and tokenisation, the built-in demo corpus and probe texts, calibration text sampled from
the dense model, and the training-data filter (fluency, advertisements) with its report."""
