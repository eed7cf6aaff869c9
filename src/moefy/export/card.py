"""The short README.md model card written next to every MoE checkpoint."""

from __future__ import annotations

from pathlib import Path

from moefy.construct.plan import PlanMeta
from moefy.construct.reconstruct import FITS_JSON


def param_count(n: int) -> str:
    """A parameter count as people write it: 6.74B, 134.5M, 41.5K. One unit for every size would print a tiny test
    model as 0.0M and a 7B one as 6738.4M."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'B' else 1}f}{unit}"
    return str(n)


def params_summary(total: int, active: int, dense: int) -> str:
    """The one-line parameter summary of a build: its card, `moefy build` and `moefy demo` print the same line."""
    return f"{param_count(total)} total, {param_count(active)} active per token (dense source: {param_count(dense)})"


def write_card(directory: Path, meta: PlanMeta, source_description: str, architecture: str,
               total_params: int, dense_params: int, reconstructed: bool = False, *, gguf: bool) -> None:
    """gguf: export-gguf takes this build (to_gguf.exportable), so the card says how to run it in llama.cpp."""
    active = meta.active_params(total_params)
    pad = meta.num_experts * meta.expert_size - meta.ffn_width
    gguf_lines = [
        "To run it in llama.cpp or Ollama: `moefy export-gguf DIR --out model.gguf` (`--outtype q4_k_m` for a "
        "K-quant), then `llama-cli -m model.gguf`.", ""] if gguf else []
    lines = [
        "---",
        "library_name: transformers",
        "tags: [moe, moefy]",
        "---",
        f"# MoE built by moefy from {meta.source}",
        "",
        f"Dense FFNs split into experts with the `{meta.method}` method; loads with stock "
        f"`AutoModelForCausalLM.from_pretrained` as `{architecture}` (no custom code).",
        "",
        "| | |",
        "|---|---|",
        f"| source | {source_description} |",
        f"| method | {meta.method} (seed {meta.seed}) |",
        f"| experts | {meta.num_experts}, top-{meta.top_k} active |",
        f"| expert size | {meta.expert_size} neurons"
        + (f" ({pad} zero padding neurons in all, exact)" if pad else "") + " |",
        f"| MoE layers | {len(meta.moe_layers)} of {meta.num_layers} |",
        f"| output scale | {meta.scales[0]:g} (folded into down_proj) |",
        f"| parameters | {params_summary(total_params, active, dense_params)} |",
        "",
        ("Its experts and routers were refitted to the dense model layer by layer, with no training "
         f"(`{FITS_JSON}` has each layer's error before and after); `moefy eval` measures what is left against the "
         "dense source." if reconstructed else
         "This is a training-free construction: expect a large quality drop until the model is trained "
         "(`moefy train`), or build it with `--reconstruct`."),
        "`moefy verify` checks that, with all experts active and a uniform router, it reproduces the dense model "
        "exactly.",
        "",
        # on a CPU, compiled batched_mm reads only the chosen experts' weights: 1.27-1.58x dense in generation on
        # two 2-core CPUs (docs/results.md, experts-impl-compiled), against 0.9-1.2x for the default kernel uncompiled
        "To generate fast: load it with `experts_implementation=\"batched_mm\"`, then "
        "`model.forward = torch.compile(model.forward, dynamic=False)`, and generate with "
        "`cache_implementation=\"static\"`.",
        "",
        *gguf_lines,
        "Files: `moefy_plan.json` + `moefy_plan.safetensors` (which dense neurons each expert holds), "
        "`moefy.yaml` (the resolved recipe).",
    ]
    (Path(directory) / "README.md").write_text("\n".join(lines) + "\n")
