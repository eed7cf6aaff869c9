"""The calibration pass's options (profile/runner.py), a section of the build recipe."""

from __future__ import annotations

from pydantic import Field

from moefy.recipes import Frozen


class ProfileOptions(Frozen):
    seq_len: int = Field(256, ge=8, description="calibration sequence length", json_schema_extra={"flag": "--seq-len"})
    tokens_per_domain: int | None = Field(4096, ge=1, description="calibration tokens per domain",
                                          json_schema_extra={"flag": "--tokens-per-domain"})
    top_fraction: float = Field(0.25, gt=0, le=1, description="a neuron is top-activated for a token if in its top "
                                                              "fraction by |activation|")
    sample_tokens: int = Field(2048, ge=16, description="tokens whose hidden states and |activations| are kept for "
                                                        "clustering and router fits")
    taylor: bool = Field(False, description="also LLaMA-MoE's |a·∂L/∂a| scores (a backward pass over the full "
                                            "model; on for importance and dive --prune-score taylor)")
    batch_size: int = Field(8, ge=1, description="calibration sequences per forward")
