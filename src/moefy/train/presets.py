"""Named training recipes. A preset is a small frozen config whose fields (token budgets first) expand into stages,
so `moefy train --recipe dive` works as is and a YAML with `preset: dive` changes only what it names."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moefy.recipes import Frozen, validate_recipe


class DivePreset(Frozen):
    """DIVE's efficient retraining (DESIGN §4): routers alone under dense soft routing, then LoRA on the experts with
    routers and norms under sparse top-k, then optionally the same at a lower learning rate."""
    preset: Literal["dive"] = "dive"
    tokens: tuple[int, int, int] = (20_000, 160_000, 20_000)  # stage 0, 1, 2 budgets; 0 skips a stage
    seq_len: int = Field(256, ge=8)
    batch_size: int = Field(4, ge=1)
    router_lr: float = Field(1e-3, gt=0)
    lr: float = Field(5e-4, gt=0)
    final_lr_ratio: float = Field(0.2, gt=0, le=1)  # stage 2's learning rate relative to stage 1's
    temperature: float = Field(1.0, gt=0)  # stage 0's soft-routing temperature
    lora_rank: int = Field(8, ge=1)
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1)

    def stages(self) -> list[dict]:
        common = {"seq_len": self.seq_len, "batch_size": self.batch_size}
        lora = {"rank": self.lora_rank, "alpha": 2.0 * self.lora_rank}
        stages = [
            {"name": "dive-0-router-soft", "trainable": "router", "tokens": self.tokens[0], "lr": self.router_lr,
             "gating": {"soft_temperature": self.temperature}},
            {"name": "dive-1-lora", "trainable": "experts-lora", "tokens": self.tokens[1], "lr": self.lr,
             "warmup_steps": 5, "lora": lora},
            {"name": "dive-2-lora-low-lr", "trainable": "experts-lora", "tokens": self.tokens[2],
             "lr": self.lr * self.final_lr_ratio, "lora": lora},
        ]
        return [{**common, **s} for s in stages if s["tokens"] > 0]


PRESETS = {"dive": DivePreset}


def expand_preset(data: dict) -> dict:
    name = data.get("preset")
    if name not in PRESETS:
        raise ValueError(f"unknown training preset {name!r} (known: {', '.join(PRESETS)})")
    preset = validate_recipe(PRESETS[name], data)
    return {"stages": preset.stages(), "seed": preset.seed, "checkpoint_every": preset.checkpoint_every}
