"""Choices of `moefy eval` that the CLI checks before anything heavy is imported."""

# transformers' experts kernels that run on any device, as a user picks one with from_pretrained(DIR,
# experts_implementation=...): on a CPU none is fastest everywhere (docs/results.md, section experts-impl)
EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "eager", "batched_mm")
