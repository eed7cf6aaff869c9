"""Expert construction: turn per-layer FFN weights (and later, calibration stats) into a MoEPlan."""
