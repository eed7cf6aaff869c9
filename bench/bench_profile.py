"""Profiling and construction benchmark (issue: data-driven construction), as ratios measured in one run:
  - the sequential calibration pass / one plain forward of the dense model over the same tokens;
  - each method's construction step (clustering, partitioning, router fit) over the whole model, in seconds and as a
    ratio to the plain forward;
  - the whole carve build (profiling included, cache cold) against the CMoE anchor (130-190 s for 16k tokens here);
  - peak RSS / checkpoint size.
SmolLM2-135M, demo corpus calib split, 4 domains × 4096 tokens = 16k tokens. Results: docs/benchmarks.md.

Usage: python bench/bench_profile.py"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from pathlib import Path

import torch

TOKENS_PER_DOMAIN = 4096


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="moefy-profile-bench-"))

    from moefy import api
    from moefy.construct.recipe import BuildRecipe
    from moefy.construct.registry import make_plan, resolve_defaults
    from moefy.data.corpus import load_corpus
    from moefy.data.demo_corpus import build_demo_corpus
    from moefy.data.tokens import token_blocks
    from moefy.families import family_for
    from moefy.models import load_causal_lm, load_tokenizer
    from moefy.profile.options import ProfileOptions
    from moefy.profile.runner import profile
    from moefy.sources import resolve_model
    from moefy.tensor_io import LazyCheckpoint

    build_demo_corpus(work / "corpus")
    corpus = load_corpus(work / "corpus" / "calib")
    source = resolve_model("smollm2-135m")
    config = source.config()
    family = family_for(config)
    opts = ProfileOptions(tokens_per_domain=TOKENS_PER_DOMAIN)

    model = load_causal_lm(source.directory)
    blocks = token_blocks(corpus, load_tokenizer(source.directory), opts.seq_len,
                          opts.tokens_per_domain, 0)
    t0 = time.perf_counter()
    with torch.no_grad():
        for d in blocks.domains:
            for s in range(0, len(blocks.blocks[d]), opts.batch_size):
                model(input_ids=blocks.blocks[d][s:s + opts.batch_size])
    forward_s = time.perf_counter() - t0
    del model

    t0 = time.perf_counter()
    stats = profile(source, family, corpus, opts, 0, work / "stats")
    profile_s = time.perf_counter() - t0

    reader = LazyCheckpoint(source.directory)
    rows = []
    for label, fields in [("random 8/2, random router", dict(method="random")),
                          ("cluster 8/2, random router", dict(method="cluster")),
                          ("coactivation 8/2, random router", dict(method="coactivation")),
                          ("carve 56/8, representative router", dict(method="carve", experts=56, top_k=8,
                                                                      router={"kind": "representative"})),
                          ("carve 56/8, fit router, partition as clustered (refine_rounds 0)",
                           dict(method="carve", experts=56, top_k=8, cluster={"refine_rounds": 0})),
                          ("carve 56/8, fit router, refined partition (default)",
                           dict(method="carve", experts=56, top_k=8))]:
        recipe = resolve_defaults(BuildRecipe(model="smollm2-135m", **fields))
        t0 = time.perf_counter()
        make_plan(recipe, family, config, reader, lambda: stats)
        rows.append((label, time.perf_counter() - t0))

    cold = work / "cold-cache"
    os.environ["MOEFY_CACHE"] = str(cold)
    (cold / "gguf").mkdir(parents=True)
    (cold / "gguf" / source.directory.name).symlink_to(source.directory.resolve())  # reuse the model, not stats
    t0 = time.perf_counter()
    api.build(BuildRecipe(model="smollm2-135m", method="carve", experts=56, top_k=8, calib=str(work / "corpus" / "calib"),
                          profile=opts), work / "moe")
    build_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = sum(f.stat().st_size for f in source.directory.glob("*.safetensors"))

    print(f"SmolLM2-135M, {blocks.tokens()} calibration tokens ({len(blocks.domains)} domains), seq_len {opts.seq_len}\n")
    print("| step | seconds | / plain forward |\n|---|---|---|")
    print(f"| plain forward of the dense model | {forward_s:.1f} | 1.00× |")
    print(f"| sequential profile (all stats + samples) | {profile_s:.1f} | {profile_s / forward_s:.2f}× |")
    for label, s in rows:
        print(f"| construction step: {label} | {s:.1f} | {s / forward_s:.2f}× |")
    print(f"| whole carve build, cold stats cache | {build_s:.1f} | {build_s / forward_s:.2f}× |")
    print(f"\nwhole carve build vs the CMoE anchor (130-190 s): {build_s / 130:.2f}-{build_s / 190:.2f}× "
          f"(goal: under 0.33×)")
    print(f"peak RSS {peak / 2**20:.0f} MiB = {peak / size:.2f}× the checkpoint ({size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
