"""Training: continual pre-training and efficient recovery of a built MoE (stages, mixtures, gating, resume)."""
