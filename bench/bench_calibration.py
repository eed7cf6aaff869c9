"""The calibration passes at scale (issue: scale): profiling and layer-wise reconstruction of a carve build (28
experts, top-4, shared 1/8: the demo's shape of MoE) on a model, on the CPU or a GPU. For each calibration budget,
in a fresh child process: seconds per decoder layer of each pass, and the peak memory above the import floor (RSS,
and the GPU's peak allocation). Calibration text: the demo corpus's calib/ split (4 domains). Results:
docs/benchmarks.md.

    python bench/bench_calibration.py smollm2-135m --tokens 1024 4096
    python bench/make_shape.py 1b && python bench/bench_calibration.py .cache/shapes/tinyllama-1b --device cuda
    python bench/bench_calibration.py smollm2-135m --tokens 16384 --max-memory default 0   # spilled vs not
    python bench/bench_calibration.py .cache/shapes/tinyllama-1b --tokens 1024 --per-layer

`--per-layer` adds a second table: the peak anonymous memory (RssAnon, sampled every 10 ms; the checkpoint's mapped
pages are not in it) before each pass's first layer, and of its first, largest and last layer, above what the
process held after imports. A layer starts where the pass hands freed memory back (`host_memory.release_freed`,
once per layer in each pass), so it shows whether a pass's peak grows with depth, which the process-wide peak
hides. `--no-trim` keeps the per-layer marks but skips the hand-back itself, to measure what it buys:

    python bench/bench_calibration.py .cache/shapes/tinyllama-1b --tokens 256 --per-layer [--no-trim]

`--step-matmul fp32 tf32` runs each budget with the reconstruction's Adam steps in each precision (with `--steps`;
`reconstruct.step_matmul`) and adds the layers' mean normalised error before and after reconstruction. On a CUDA GPU
TF32 is the tensor cores'; on the CPU, which has none, it is emulated (`EmulatedTF32`), so the quality of the
default can be measured on a real model here and its speed on a GPU:

    python bench/bench_calibration.py smollm2-135m --tokens 4096 --steps 300 --step-matmul fp32 tf32

The shapes have random weights: right for time and memory, meaningless for quality."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memory_use import anon, rss  # noqa: E402




class LayerPeaks:
    """The peak of `anon()` per layer of each pass. A daemon thread samples; `mark()` closes the current layer.
    `passes` maps each pass to [before its first layer, layer 0, layer 1, ...]: a pass marks at the start of every
    layer, so its first mark closes its setup (tokens, embeddings), and the mark after the pass its last layer."""

    def __init__(self) -> None:
        from moefy.host_memory import release_freed

        release_freed()  # the floor is what is live after imports, not also what glibc kept after freeing it
        self.floor, self.peak, self.passes = anon(), 0, {}
        self.current: list[int] = []
        self.lock = threading.Lock()  # a reset between the sampler's read and its write would be lost
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            with self.lock:
                self.peak = max(self.peak, anon())
            time.sleep(0.01)

    def mark(self) -> None:
        with self.lock:
            self.current.append(max(self.peak, anon()) - self.floor)
            self.peak = 0

    def start(self, name: str) -> None:
        with self.lock:
            self.peak, self.current = 0, []
        self.passes[name] = self.current


class EmulatedTF32:
    """The CPU's stand-in for CUDA's TF32 matmuls, forward and backward: both factors of every fp32 matmul rounded
    (to nearest even) to TF32's 10 mantissa bits, products summed in fp32, as the tensor cores do."""

    def __init__(self) -> None:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        aten = torch.ops.aten
        factors = {aten.mm.default: (0, 1), aten.bmm.default: (0, 1), aten.addmm.default: (1, 2)}

        def tf32(t):
            bits = t.contiguous().view(torch.int32)
            return ((bits + 0xFFF + ((bits >> 13) & 1)) & -8192).view(torch.float32)

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in factors:
                    args = tuple(tf32(a) if i in factors[func] and a.dtype == torch.float32 else a
                                 for i, a in enumerate(args))
                return func(*args, **(kwargs or {}))

        self.mode = Mode

    def patch(self) -> None:
        """Enter the emulation exactly where the library turns TF32 on: the Adam steps' `refit._cuda_tf32`."""
        from contextlib import contextmanager

        import moefy.construct.refit as refit

        cuda_tf32 = refit._cuda_tf32

        @contextmanager
        def emulated(enabled: bool):
            with cuda_tf32(enabled):
                if enabled:
                    with self.mode():
                        yield
                else:
                    yield

        refit._cuda_tf32 = emulated


def child(model: str, device: str, tokens: int, steps: int, max_memory: str | None, per_layer: bool, trim: bool,
          step_matmul: str) -> dict:
    import torch

    from moefy.construct.recipe import BuildRecipe, ReconstructOptions
    from moefy.construct.reconstruct import reconstruct
    from moefy.construct.registry import make_plan, resolve_defaults
    from moefy.data.corpus import load_corpus
    from moefy.data.demo_corpus import build_demo_corpus
    from moefy.families import family_for
    from moefy.models import compute_device
    from moefy.profile.options import ProfileOptions
    from moefy.profile.runner import profile
    from moefy.sources import resolve_model
    from moefy.tensor_io import LazyCheckpoint

    work = Path(tempfile.mkdtemp(prefix="moefy-calib-bench-"))
    build_demo_corpus(work / "corpus")
    corpus = load_corpus(work / "corpus" / "calib")
    source = resolve_model(model)
    config, dev = source.config(), compute_device(device)
    family = family_for(config)
    if dev.type == "cuda":
        torch.zeros(1, device=dev)  # the CUDA context is part of the floor, not of the pass
    elif step_matmul == "tf32":
        EmulatedTF32().patch()
    floor = rss()
    peaks = LayerPeaks() if per_layer else None
    if peaks:  # both passes call release_freed once per layer, the profiler through materialise_layer
        import moefy.construct.registry as registry
        import moefy.profile.runner as runner

        for module in (runner, registry):
            module.release_freed = lambda freed=module.release_freed: (peaks.mark(), trim and freed())
        peaks.start("profile")
    t0 = time.perf_counter()
    stats = profile(source, family, corpus, ProfileOptions(tokens_per_domain=tokens), 0, work / "stats", device,
                    max_memory)
    profile_s = time.perf_counter() - t0
    profile_rss = rss()
    if peaks:
        peaks.mark()
        peaks.start("plan")
    calib = str(work / "corpus" / "calib")
    recipe = resolve_defaults(BuildRecipe(model=model, method="carve", experts=28, top_k=4, calib=calib))
    t0 = time.perf_counter()
    plan = make_plan(recipe, family, config, LazyCheckpoint(source.directory), lambda: stats)
    plan_s = time.perf_counter() - t0
    plan_rss = rss()
    if peaks:
        peaks.mark()
        peaks.start("reconstruct")
    opts = ReconstructOptions(enabled=True, tokens_per_domain=tokens, steps=steps, step_matmul=step_matmul)
    t0 = time.perf_counter()
    _, fits = reconstruct(plan, source, family, corpus, opts, 0, device, spill=work / "spill", max_memory=max_memory)
    reconstruct_s = time.perf_counter() - t0
    if peaks:
        peaks.mark()
    layers = int(config["num_hidden_layers"])
    return {"profile_s_per_layer": profile_s / layers, "reconstruct_s_per_layer": reconstruct_s / layers,
            "plan_s_per_layer": plan_s / layers, "nmse_before": sum(f.before for f in fits) / len(fits),
            "nmse_after": sum(f.after for f in fits) / len(fits),
            "profile_rss": profile_rss - floor, "plan_rss": plan_rss - floor, "peak_rss": rss() - floor,
            "tokens": sum(stats.meta.tokens),
            "gpu_peak": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "layers": layers,
            # one carried copy of the hidden states (fp32); the profiler carries one, reconstruction two
            "activations": sum(stats.meta.tokens) * int(config["hidden_size"]) * 4,
            "per_layer": peaks.passes if peaks else None}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--device", default="auto")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="calibration tokens per domain")
    p.add_argument("--steps", type=int, default=0, help="reconstruction Adam steps per layer (0: closed form only)")
    p.add_argument("--max-memory", nargs="+", default=["default"],
                   help="activation budgets to run each token budget under (default: moefy's own; 0: always spill)")
    p.add_argument("--per-layer", action="store_true", help="also the peak memory of each pass's layers (Linux)")
    p.add_argument("--no-trim", action="store_true", help="with --per-layer: do not hand freed memory back")
    p.add_argument("--step-matmul", nargs="+", default=["fp32"], choices=["fp32", "tf32"],
                   help="the Adam steps' matmul precision(s) to run each budget with (TF32 is emulated on the CPU)")
    p.add_argument("--child", type=int)
    args = p.parse_args()
    if args.child:
        budget = None if args.max_memory[0] == "default" else args.max_memory[0]
        print(json.dumps(child(args.model, args.device, args.child, args.steps, budget, args.per_layer,
                               not args.no_trim, args.step_matmul[0])))
        return
    print(f"model {args.model}, device {args.device}, carve 28 experts top-4 + shared 1/8, reconstruction "
          f"{args.steps} Adam steps per layer\n")
    print("| device | calibration tokens | activations (one copy) | --max-memory | step matmul | profile s / layer "
          "| carve plan s / layer | reconstruct s / layer | reconstruct ÷ profile "
          "| peak RSS above imports (profile / + carve plan / build) | GPU peak | layer NMSE before → after (mean) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    layered = []
    for tokens, budget, matmul in [(t, m, p) for t in args.tokens for m in args.max_memory for p in args.step_matmul]:
        env = {**os.environ, "MOEFY_QUIET": "1"}
        out = subprocess.run([sys.executable, __file__, args.model, "--device", args.device, "--steps",
                              str(args.steps), "--max-memory", budget, "--step-matmul", matmul,
                              "--child", str(tokens)]
                             + ["--per-layer"] * args.per_layer + ["--no-trim"] * args.no_trim, env=env, check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        gpu = f"{r['gpu_peak'] / 2**30:.2f} GiB" if r["gpu_peak"] is not None else "–"
        print(f"| {r['device']} | {r['tokens']} | {r['activations'] / 2**20:.0f} MiB | {budget} | {matmul} "
              f"| {r['profile_s_per_layer']:.2f} | {r['plan_s_per_layer']:.2f} | "
              f"{r['reconstruct_s_per_layer']:.2f}"
              f" | {r['reconstruct_s_per_layer'] / r['profile_s_per_layer']:.2f}× | {r['profile_rss'] / 2**30:.2f} / "
              f"{r['plan_rss'] / 2**30:.2f} / {r['peak_rss'] / 2**30:.2f} GiB | {gpu} "
              f"| {r['nmse_before']:.4g} → {r['nmse_after']:.4g} |", flush=True)
        if r["per_layer"]:
            layered.append((r["tokens"], budget, r["per_layer"]))
    if layered:
        print("\n| calibration tokens | --max-memory | pass | layers | peak anonymous memory above imports: "
              "before layer 0 / layer 0 / largest layer (which) / last layer |")
        print("|---|---|---|---|---|")
    for tokens, budget, passes in layered:
        for name, (setup, *peaks) in passes.items():
            top = max(range(len(peaks)), key=peaks.__getitem__)
            print(f"| {tokens} | {budget} | {name} | {len(peaks)} | {setup / 2**30:.2f} / {peaks[0] / 2**30:.2f} / "
                  f"{peaks[top] / 2**30:.2f} (layer {top}) / {peaks[-1] / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
