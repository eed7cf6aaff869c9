"""Choices of `moefy eval` that the CLI checks before anything heavy is imported."""

# transformers' experts kernels that run on any device, as a user picks one with from_pretrained(DIR,
# experts_implementation=...): on a CPU none is fastest everywhere (docs/results.md, section experts-impl)
EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "eager", "batched_mm")

# eager loops over the experts that got tokens, with data-dependent shapes: torch.compile breaks its graph at every
# expert and compiles again for every new token count, so a compiled timing of it measures the compiler
NOT_COMPILABLE = ("eager",)
