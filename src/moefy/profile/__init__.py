"""Calibration profiling: per-layer, per-domain FFN neuron statistics from one sequential pass."""
