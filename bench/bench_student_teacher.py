"""Where a trained MoE's held-out perplexity differs from its dense teacher's (issue: near-lossless conversion).

Distillation alone (KL to the dense model's logits, no labels) has taken the demo's html domain below the dense
model's perplexity (docs/results.md, the half-start distillation tables), which reads as a student better than its
teacher. This bench splits each model's held-out loss by how surprising the dense model found each token: per domain,
the perplexity ÷ dense, the mean entropy of the next-token distribution, how often its top token is the true one,
and, in bins of the dense model's probability of the true token, the nats per token the model saves against dense
(positive: it gives the true token more probability than dense does).

Usage: python bench/bench_student_teacher.py LABEL=MOE_DIR [LABEL=MOE_DIR ...]   (run it alone; writes
docs/results.md section 'student-teacher')"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from moefy.data.tokens import stream
from moefy.models import load_causal_lm
from moefy.profile.perplexity import same_width_batches, windows
from moefy.sources import resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from common import EVAL_TOKENS, MODEL, setup  # noqa: E402
from docs_sections import replace_section  # noqa: E402

SEQ_LEN = 256
# bins of the dense model's probability of the true token: its confident hits at the top, its surprises at the bottom
BINS = (0.0, 0.01, 0.1, 0.5, 0.9, 1.0 + 1e-9)


@torch.no_grad()
def token_stats(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per scored token, in heldout_perplexity's windows: the log-probability of the true token, the entropy of the
    next-token distribution, and whether its top token is the true one. Only these vectors are kept, never logits."""
    logp, entropy, hit = [], [], []
    for chunk in same_width_batches(windows(len(ids), SEQ_LEN, SEQ_LEN - 1), 8):
        logits = model(input_ids=torch.stack([ids[s:e] for s, e, _ in chunk])).logits
        for row, (s, e, first) in enumerate(chunk):
            lo = first - 1 if first else 0
            lp = logits[row, lo:e - s - 1].float().log_softmax(-1)
            target = ids[s + 1 + lo:e]
            logp.append(lp.gather(1, target[:, None])[:, 0])
            entropy.append(-(lp.exp() * lp).sum(-1))
            hit.append(lp.argmax(-1) == target)
        del logits
    return {"logp": torch.cat(logp), "entropy": torch.cat(entropy), "hit": torch.cat(hit).float()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+", help="LABEL=MOE_DIR: MoEs built from SmolLM2-135M")
    args = p.parse_args()
    models = [m.split("=", 1) for m in args.models]
    labels = [m[0] for m in models if len(m) == 2]
    # the labels key the table rows and the stats, where "dense" is the teacher's
    if len(labels) < len(models) or len({*labels, "dense"}) != len(labels) + 1:
        raise SystemExit("give each model as LABEL=MOE_DIR, with distinct labels other than 'dense'")
    with tempfile.TemporaryDirectory(prefix="moefy-student-teacher-") as work:
        bench = setup(Path(work))  # the demo corpus, written here and read into memory
    ids = {d: stream(texts, bench.tokenizer, EVAL_TOKENS) for d, texts in bench.held.by_domain().items()}
    stats = {}
    for label, path in [("dense", resolve_model(MODEL).directory), *models]:
        model = load_causal_lm(path)
        stats[label] = {d: token_stats(model, x) for d, x in ids.items()}
        del model
        print(f"{label}: done", flush=True)

    dense = stats["dense"]
    command = " ".join(f'"{label}=DIR"' for label, _ in models)
    lines = [
        "## Where a trained MoE's loss differs from its dense teacher's (SmolLM2-135M, demo held-out)",
        "",
        f"`python bench/bench_student_teacher.py {command}`, alone on "
        f"the machine. The demo held-out domains, {EVAL_TOKENS} tokens each at context {SEQ_LEN} (the windows of "
        "`moefy eval`). Per model and domain: perplexity ÷ dense; the mean entropy of its next-token distribution "
        "(nats); how often its top token is the true one.",
        "",
        "| model | domain | perplexity ÷ dense | mean entropy | top-1 = true token |",
        "|---|---|---|---|---|",
    ]
    for label in stats:
        for d, s in stats[label].items():
            ratio = torch.exp(dense[d]["logp"].mean() - s["logp"].mean()).item()
            lines.append(f"| {label} | {d} | ×{ratio:.3f} | {s['entropy'].mean():.3f} | {s['hit'].mean():.1%} |")
    bins = list(zip(BINS, BINS[1:], strict=False))
    edges = [f"{lo:.0%}–{min(hi, 1):.0%}" for lo, hi in bins]
    lines += [
        "",
        "Nats per token the model saves against dense (its log-probability of the true token minus dense's, summed "
        "over the tokens in each bin of dense's probability of the true token, ÷ all the domain's tokens; the bins "
        "add up to the total, and the total is minus the log of the perplexity ratio above). The share of tokens "
        "in each bin is dense's.",
        "",
        f"| model | domain | {' | '.join(edges)} | total |",
        f"|---|---|{'---|' * len(edges)}---|",
    ]
    for d, s in dense.items():
        p_true = s["logp"].exp()
        shares = [((p_true >= lo) & (p_true < hi)).float().mean().item() for lo, hi in bins]
        lines.append(f"| dense: share of tokens | {d} | " + " | ".join(f"{x:.0%}" for x in shares) + " | |")
    for label, _ in models:
        for d, s in stats[label].items():
            p_true, saved = dense[d]["logp"].exp(), s["logp"] - dense[d]["logp"]
            cells = [saved[(p_true >= lo) & (p_true < hi)].sum().item() / len(saved) for lo, hi in bins]
            lines.append(f"| {label} | {d} | " + " | ".join(f"{x:+.3f}" for x in cells) + f" | {saved.mean():+.3f} |")
    replace_section(Path(__file__).parent.parent / "docs" / "results.md", "student-teacher", "\n".join(lines))


if __name__ == "__main__":
    main()
