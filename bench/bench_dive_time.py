"""Where a DIVE build's time goes, against carve on the same corpus (issue: scale §2). SmolLM2-135M; the demo
corpus's calib/ with `code` and `docs` each split into two labelled domains (6 domains); DIVE builds 8 experts, so
two more domains come from splitting by document embeddings. One build per run, under cProfile, with a fresh stats
cache (so both pay for their profile); run it alone, once per method:

    python bench/bench_dive_time.py carve
    python bench/bench_dive_time.py dive
    python bench/bench_dive_time.py dive dive.affinity_tokens_per_domain=512 dive.embed_tokens=128

Prints the total and the cumulative time of the build's big steps; the whole profile is saved next to the build
(`profile.pstats`, for `python -m pstats` or snakeviz). Recipe fields given as SECTION.FIELD=VALUE
change the build, and the result is then compared with the plain `dive` run's (run that first): the largest change
of the affinity matrix, and whether the domain splits and the groups are the same. Results: docs/benchmarks.md."""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

WORK = Path("out/bench-dive-time")
STEPS = ("profile/runner.py:", "domains.py:", "_cross_losses", "router_fit.py:", "cluster.py:")


def six_domains(work: Path) -> Path:
    from moefy.data.demo_corpus import build_demo_corpus

    if not (work / "corpus" / "calib").is_dir():
        build_demo_corpus(work / "corpus")
    six = work / "six.jsonl"
    with open(six, "w") as fh:
        for f in sorted((work / "corpus" / "calib").glob("*.jsonl")):
            for i, line in enumerate(f.read_text().splitlines()):
                domain = f.stem + ("-b" if f.stem in ("code", "docs") and i % 2 else "")
                fh.write(json.dumps({"text": json.loads(line)["text"], "domain": domain}) + "\n")
    return six


def overrides(items: list[str]) -> dict:
    """['dive.embed_tokens=128', ...] -> {'dive': {'embed_tokens': 128}} (values read as YAML), nested the way the
    CLI's recipe flags are."""
    import argparse

    import yaml

    from moefy.recipe_flags import PREFIX, recipe_overrides

    pairs = (item.split("=", 1) for item in items)
    return recipe_overrides(argparse.Namespace(**{PREFIX + key: yaml.safe_load(value) for key, value in pairs}))


def compare(reference: Path, variant: Path) -> None:
    """How far the variant's mining moved from the reference's."""
    import numpy as np

    a, b = (json.loads((p / "dive" / "mining.json").read_text()) for p in (reference, variant))
    delta = np.abs(np.array(a["affinity"]) - np.array(b["affinity"]))
    print(f"  against {reference.name}: max |Δ affinity| {delta.max():.4f} (mean {delta.mean():.4f}); "
          f"splits {'same' if a['discovery'].get('assignment') == b['discovery'].get('assignment') else 'DIFFER'}; "
          f"groups {'same' if a['groups'] == b['groups'] else 'DIFFER: ' + json.dumps(b['groups'])}")


def main() -> None:
    which, changes = sys.argv[1], overrides(sys.argv[2:])
    out = WORK / "-".join([which, *(a.replace("=", "").replace(".", "_") for a in sys.argv[2:])])
    fields = {"dive": dict(method="dive", experts=8, top_k=2), "carve": dict(method="carve", experts=56, top_k=8)}
    calib = six_domains(WORK)
    from moefy.sources import cache_dir, resolve_model

    gguf_cache = cache_dir() / "gguf"
    resolve_model("smollm2-135m")  # dequantised once into the shared cache, outside the timing
    with tempfile.TemporaryDirectory() as fresh:  # a stats cache of its own: the profile is part of the build
        os.symlink(gguf_cache, Path(fresh) / "gguf")
        os.environ["MOEFY_CACHE"] = fresh
        from moefy import api
        from moefy.construct.recipe import BuildRecipe
        from moefy.recipes import deep_merge, validate_recipe

        recipe = validate_recipe(BuildRecipe, deep_merge({"model": "smollm2-135m", "calib": str(calib),
                                                          "profile": {"tokens_per_domain": 4096}, **fields[which]},
                                                         changes))
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.runcall(api.build, recipe, out, overwrite=True)
        total = time.perf_counter() - t0
    prof.dump_stats(out / "profile.pstats")
    stats = pstats.Stats(prof).stats
    print(f"{which}: {total:.0f} s")
    for step in STEPS:
        cum = max((v[3] for k, v in stats.items() if step in f"{k[0]}:{k[1]}:{k[2]}"), default=0.0)
        print(f"  {step:22s} {cum:6.0f} s (largest cumulative entry)")
    if which == "dive" and changes and (WORK / "dive" / "dive" / "mining.json").is_file():
        compare(WORK / "dive", out)


if __name__ == "__main__":
    main()
