"""Every output format in transformers and in llama.cpp (SmolLM2-135M, demo corpus), all in one run:

- held-out perplexity from each client (llama.cpp tokenising with the GGUF's own tokenizer);
- top-1 agreement and the largest logit gap on the same token ids (transformers' tokenisation), per GGUF outtype;
- the near-tied routing decisions that make top-1 flip between kernels (moefy verify's measure);
- prompt (prefilled: the last position's logits) and generation tokens/s, each model ÷ dense in the same client
  (llama.cpp: per outtype, f16, q8_0 and Q4_K_M, its extra buffer types off as on a laptop without AMX).

Usage: python bench/bench_gguf.py [--work DIR] [--quick] [--reuse]   (--quick: no reconstructed build)
Needs llama-cpp-python (make setup-llama). It times models: run it alone. Writes docs/results.md section 'gguf'."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from moefy import api
from moefy.data.tokens import stream
from moefy.errors import MoefyError
from moefy.evaluate.speed import measure, ratios
from moefy.export.llama_cpp import LlamaCppLM
from moefy.models import load_causal_lm
from moefy.profile.perplexity import heldout_perplexity
from moefy.sources import resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from common import EVAL_TOKENS, MODEL, cpu_name, saved_rows, setup  # noqa: E402
from docs_sections import replace_section  # noqa: E402

BUILDS = [  # (name, build recipe fields); None: the dense source itself
    ("dense", None),
    ("Mixtral 8 experts, top-2 (random split)", dict(method="random", experts=8, top_k=2)),
    ("carve 25% (56 experts top-8 + shared), Qwen2-MoE -> granitemoe", dict(method="carve", experts=56, top_k=8)),
    # make demo's split, the granularity the frontier chose (docs/results.md, frontier), with today's reconstruction
    ("carve 25% (28 × 48, top-4, make demo's split) + reconstruction", dict(method="carve", experts=28, top_k=4,
                                                                           reconstruct={"enabled": True})),
]
OUTTYPES = ("f32", "f16", "q8_0", "q4_k_m")
# `moefy export-gguf`'s default, q8_0, and Q4_K_M: the type most GGUFs that people run come in
SPEED_OUTTYPES = ("f16", "q8_0", "q4_k_m")
PROMPT, NEW = 512, 64


@torch.no_grad()
def agreement(hf, gguf: LlamaCppLM, ids: torch.Tensor, windows: int = 4, seq: int = 256) -> tuple[float, float]:
    """(share of positions whose argmax agrees, max |Δlogit| ÷ max |logit|) on the first windows of `ids`."""
    same = total = 0
    gap = 0.0
    for w in range(windows):
        x = ids[None, w * seq:(w + 1) * seq]
        a, b = hf(input_ids=x).logits[0], gguf(input_ids=x).logits[0][:, : hf.config.vocab_size]
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += x.shape[1]
        gap = max(gap, float((a - b).abs().max() / a.abs().max()))
    return same / total, gap


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("out/bench-gguf"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="keep builds already in --work (from an earlier run)")
    ap.add_argument("--docs-only", action="store_true", help="rewrite the docs section from --work/gguf.json")
    args = ap.parse_args()
    if args.docs_only:
        write_docs(*saved_rows(args.work / "gguf.json"))
        return
    bench = setup(args.work)
    rows = BUILDS[:-1] if args.quick else BUILDS
    dirs = {}
    for name, fields in rows:
        short = args.work / (name.split()[0] + str(len(dirs)))
        if fields is None:
            dirs[name] = resolve_model(MODEL).directory
        elif args.reuse and (short / "config.json").is_file():
            dirs[name] = short
        else:
            dirs[name] = bench.build(short.name, **fields)
    # 256 tokens of each held-out domain, in transformers' tokenisation, for the same-ids comparison
    ids = torch.cat([stream(texts, bench.tokenizer, 256) for texts in bench.held.by_domain().values()])
    result: dict[str, dict] = {}
    hf_models, gguf_models = {}, {}  # gguf_models: (outtype, name) -> LlamaCppLM, for the speed table
    for name, _ in rows:
        hf = load_causal_lm(dirs[name])
        hf_models[name] = hf
        r = {"ppl_transformers": bench.evaluate(dirs[name]).ppl(), "outtypes": {}}
        for outtype in OUTTYPES:
            path = args.work / f"{len(result)}-{outtype}.gguf"
            s = api.export_gguf(str(dirs[name]), path, outtype, overwrite=True)
            r["outtypes"][outtype] = {"arch": s.architecture, "mib": s.size_bytes / 2**20}
            try:  # a file llama.cpp cannot load or crashes on (as a build with an AMX backend did on q8_0) is
                # recorded, and the run goes on. Extra buffer types off: on a Xeon with AMX they would run the dense
                # model's matmuls on AMX and never an MoE's expert matmuls (mul_mat_id), which no laptop has.
                lm = LlamaCppLM(path, n_ctx=PROMPT + NEW + 8, extra_buffers=False)
            except MoefyError as exc:
                r["outtypes"][outtype]["error"] = str(exc)
                continue
            top1, gap = agreement(hf, lm, ids)
            ppl = heldout_perplexity(lm, lm.tokenizer, bench.held, seq_len=256, tokens_per_domain=EVAL_TOKENS).ppl()
            r["outtypes"][outtype].update(top1=top1, max_rel_logit_gap=gap, ppl_llama_cpp=ppl)
            if outtype in SPEED_OUTTYPES:
                gguf_models[outtype, name] = lm
        if dict(BUILDS)[name] is not None:
            r["near_tied"] = api.verify(dirs[name], MODEL).near_tie_fraction
        result[name] = r
        print(json.dumps({name: r}, indent=1), flush=True)
    probe = torch.randint(0, hf_models[rows[0][0]].config.vocab_size, (4, PROMPT),
                          generator=torch.Generator().manual_seed(0))
    hf_speed = measure(hf_models, probe, new_tokens=NEW)
    ll_speed = measure(gguf_models, probe, new_tokens=NEW)  # both outtypes interleaved
    clients = {"transformers": hf_speed} | {f"llama.cpp {o}": {name: sp for (out, name), sp in ll_speed.items()
                                                               if out == o} for o in SPEED_OUTTYPES}
    dense = rows[0][0]
    for name, _ in rows:
        result[name]["speed"] = {
            client: {**{f"{what}_x_dense": x for what, x in ratios(sp[name], sp[dense]).items()},
                     "prefill_tok_s": sp[name].prefill_tokens_per_s, "gen_tok_s": sp[name].generate_tokens_per_s,
                     "active_over_total": sp[name].active_params / sp[name].total_params}
            for client, sp in clients.items() if name in sp and dense in sp}
    (args.work / "gguf.json").write_text(json.dumps({"cpu": cpu_name(), "rows": result}, indent=1))
    write_docs(result, cpu_name())


def write_docs(result: dict, cpu: str) -> None:
    dense = result["dense"]["ppl_transformers"]
    lines = ["### transformers vs llama.cpp, per output format (SmolLM2-135M, demo held-out)", "",
             f"`python bench/bench_gguf.py` (needs `make setup-llama`); alone, on {cpu}, 2 threads. Perplexity ÷ "
             "the dense model in transformers; top-1 = share of positions where both clients predict the same next "
             "token on the same ids (1,024 positions); gap = max |Δlogit| ÷ max |logit|; near-tied = routing decisions "
             "whose k-th and (k+1)-th logits differ by ≤ 1e-3 of the token's logit spread (`moefy verify`).", "",
             "| model | GGUF arch | near-tied | ppl transformers | GGUF | MiB | ppl llama.cpp | top-1 | gap |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result.items():
        for outtype, o in r["outtypes"].items():
            cells = (["failed (below)"] * 3 if "error" in o else
                     [f"×{o['ppl_llama_cpp'] / dense:.2f}", f"{o['top1']:.1%}", f"{o['max_rel_logit_gap']:.1e}"])
            lines.append(f"| {name} | {o['arch']} | {r.get('near_tied', 0):.1%} | ×{r['ppl_transformers'] / dense:.2f} "
                         f"| {outtype} | {o['mib']:.0f} | " + " | ".join(cells) + " |")
    errors = {o["error"] for r in result.values() for o in r["outtypes"].values() if "error" in o}
    lines += [f"\nllama.cpp failed: {e}" for e in sorted(errors)]
    lines += ["", f"### Speed, each model ÷ dense in the same client and run (prompt {PROMPT} tokens × 4, prefilled: "
              f"the last position's logits, as generation and llama-bench compute them; generation {NEW} tokens "
              f"greedy; llama.cpp on the {', '.join(SPEED_OUTTYPES)} GGUFs, each ÷ the dense model's GGUF of the "
              "same outtype, its extra buffer types off; transformers f32)", "",
              "| model | active/total | transformers prefill | transformers gen | "
              + " | ".join(f"llama.cpp {o} prefill | llama.cpp {o} gen" for o in SPEED_OUTTYPES) + " |",
              "|---|---|---|---|" + "---|---|" * len(SPEED_OUTTYPES)]
    for name, r in result.items():
        sp = r["speed"]
        clients = ["transformers"] + [f"llama.cpp {o}" for o in SPEED_OUTTYPES]
        cells = [f"{sp[c]['prefill_x_dense']:.2f}× | {sp[c]['generate_x_dense']:.2f}×" if c in sp else "— | —"
                 for c in clients]
        lines.append(f"| {name} | {sp['transformers']['active_over_total']:.2f} | " + " | ".join(cells) + " |")
    same = [abs(r["outtypes"]["f32"]["ppl_llama_cpp"] / r["ppl_transformers"] - 1) for name, r in result.items()
            if not name.startswith("Mixtral") and "ppl_llama_cpp" in r["outtypes"]["f32"]]
    lines += ["", f"Reading: the dense and carve rows compute the same function in both clients (f32 perplexity "
              f"within {max(same):.1%}; before the GraniteMoeShared restatement, the Qwen2-MoE output gave NaN or ×44 "
              "in llama.cpp). Per-token agreement falls with the share of near-tied routing decisions: an expert "
              "choice that flips between kernels in one layer moves that position's stream, and every later position "
              "attends to it. The random-split Mixtral is a broken model (no calibration, no training), whose "
              "chaotic logits amplify any such flip."]
    d = result["dense"]["speed"]
    rates = ", ".join(f"{c} {v['prefill_tok_s']:.0f} / {v['gen_tok_s']:.1f} tok/s" for c, v in d.items())
    lines += ["", f"Dense absolute rates in this run (prefill / generation; noise on a shared machine, only the ratios "
              f"are claims): {rates}."]
    replace_section(Path("docs/results.md"), "gguf", "\n".join(lines))


if __name__ == "__main__":
    main()
