"""The reconstruction's Adam steps alone (construct/refit.py `refine`), at one MoE layer's shapes, on synthetic
tensors: seconds for the steps in each matmul precision, and, with --profile, where a step's time goes (torch's
profiler, the top operators by device time). Quality is not measured here: the tensors are random
(bench_calibration.py --step-matmul measures the layers' errors on a real model).

    python bench/bench_refine.py --shape 7b --device cuda --profile
    python bench/bench_refine.py --shape smollm2 --device cpu
    python bench/bench_refine.py --shape 1b --device cuda --forms   # each routed-block form, on this device

Shapes are carve's demo split (28 experts, top-4, a shared eighth of the FFN) of a model's FFN; tokens: 4 domains ×
4,096, as `bench_calibration.py --tokens 4096`."""

from __future__ import annotations

import argparse
import time

import torch

from moefy.construct import refit
from moefy.construct.recipe import ReconstructOptions

SHAPES = {"smollm2": (576, 1536), "1b": (2048, 5632), "7b": (4096, 11008)}  # hidden, FFN width
EXPERTS, TOP_K, SHARED = 28, 4, 1 / 8


def problem(hidden: int, width: int, tokens: int, device: str) -> tuple:
    g = torch.Generator().manual_seed(0)
    shared = int(width * SHARED)
    routed = width - shared - (width - shared) % EXPERTS

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(device)

    params = {"gate": rand(routed, hidden, scale=hidden**-0.5), "up": rand(routed, hidden, scale=hidden**-0.5),
              "down": rand(hidden, routed, scale=width**-0.5), "shared_gate": rand(shared, hidden, scale=hidden**-0.5),
              "shared_up": rand(shared, hidden, scale=hidden**-0.5), "shared_down": rand(hidden, shared,
                                                                                        scale=width**-0.5)}
    x, y, router = rand(tokens, hidden), rand(tokens, hidden, scale=0.1), rand(EXPERTS, hidden, scale=0.02)
    masks = (torch.ones(routed, dtype=torch.bool, device=device), torch.ones(shared, dtype=torch.bool, device=device))
    return x, y, refit.route(x @ router.T, TOP_K), params, masks, router


def run(args_problem: tuple, steps: int, tf32: bool, device: str) -> float:
    x, y, weights, params, masks, router = args_problem
    opts = ReconstructOptions()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    refit.refine(x, y, weights, TOP_K, params, masks, steps, opts.lr_ratio, opts.step_tokens, 0, None, router, tf32)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def compare_forms(data: tuple, args: argparse.Namespace) -> None:
    """The steps with each form swapped in for the one refit.routed_output_form picks for this device, so that the
    choice it makes is measured here rather than assumed."""
    chosen_for_device = refit.routed_output_form
    print(f"{args.shape} layer on {args.device}: {args.steps} steps, s for the steps by routed-block form\n\n"
          "| form | fp32 | tf32 |\n|---|---|---|")
    try:
        for form in (refit.chosen_experts_output, refit.all_experts_output):
            refit.routed_output_form = lambda device, form=form: form
            run(data, 5, False, args.device)
            print(f"| {form.__name__} | {run(data, args.steps, False, args.device):.2f} | "
                  f"{run(data, args.steps, True, args.device):.2f} |", flush=True)
    finally:
        refit.routed_output_form = chosen_for_device


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--steps", type=int, default=ReconstructOptions().steps)
    p.add_argument("--profile", action="store_true", help="also profile 20 steps of each precision")
    p.add_argument("--forms", action="store_true",
                   help="time each routed-block form (chosen experts only, all experts) instead of the device's own")
    args = p.parse_args()
    data = problem(*SHAPES[args.shape], args.tokens, args.device)
    if args.forms:
        compare_forms(data, args)
        return
    run(data, 5, False, args.device)  # warm-up: kernels, allocator
    print(f"{args.shape} layer on {args.device}: {args.steps} steps of {ReconstructOptions().step_tokens} tokens, "
          f"router trained\n\n| step matmul | s for the steps | ÷ fp32 |\n|---|---|---|")
    fp32 = run(data, args.steps, False, args.device)
    print(f"| fp32 | {fp32:.2f} | 1.00× |")
    tf32 = run(data, args.steps, True, args.device)
    print(f"| tf32 | {tf32:.2f} | {tf32 / fp32:.2f}× |", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
        for tf in (False, True):
            with profile(activities=acts) as prof:
                run(data, 20, tf, args.device)
            print(f"\n20 steps, {'tf32' if tf else 'fp32'}:\n" + prof.key_averages().table(sort_by=key, row_limit=14))


if __name__ == "__main__":
    main()
