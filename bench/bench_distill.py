"""Peak host memory and time of the distillation loss (KL(teacher ‖ student) at temperature T, forward and backward)
on vocabulary-wide logits: the plain formula under autograd against moefy's chunked loss (train/distill.py); and
the LM loss a distillation stage with LM weight 0 logs, in the graph (before) against outside it (now).
Student and teacher logits are random, fp32, SmolLM2's vocabulary by default; the model itself is left out, so the
figures are what the loss adds to a training step.

    python bench/bench_distill.py --batch 8 --seq-len 512 --vocab 49152

With --train MOE_DIR --data CORPUS it instead trains that moefy-built MoE for 10 steps of a distillation stage
(the whole experts at T = 2, batch 4 × 256, fp32) and prints the process's peak RSS and the median tokens/s of steps
2-10: the loss inside a real step. For the code before a change, run the same command with PYTHONPATH pointing at
a worktree of the older commit's src/.

Each variant runs in a child process of its own, one after the other; run it alone. Prints the peak RSS above what
the child held with both logits allocated, the seconds, and the largest difference between the KL's two gradients.
Results: docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The KL alone, before and now; then the whole loss of a stage with the default LM weight 0 (KL, and the LM loss
# it logs), before and now.
VARIANTS = ("formula", "chunked", "formula+lm-autograd", "chunked+lm-logged")


def child(variant: str, batch: int, seq_len: int, vocab: int, t: float, grad_file: str) -> dict:
    import torch

    from moefy.host_memory import release_freed
    from moefy.train.distill import ChunkedKL, logged_lm_loss

    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(batch, seq_len, vocab, generator=gen) * 3).requires_grad_()
    teacher = torch.randn(batch, seq_len, vocab, generator=gen) * 3
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    release_freed()
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if variant.startswith("formula"):  # what train/distill.py computed before the chunked loss
        teacher_logp = torch.log_softmax(teacher.float() / t, dim=-1)
        student_logp = torch.log_softmax(student.float() / t, dim=-1)
        loss = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean() * t * t
    else:
        loss = ChunkedKL.apply(student, teacher, t) / (batch * seq_len)
    if variant == "formula+lm-autograd":  # the LM loss at weight 0 as the step computed it before: in the graph
        lm = torch.nn.functional.cross_entropy(student[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss = loss + 0 * lm
    elif variant == "chunked+lm-logged":  # as the step computes it now
        logged_lm_loss(student, ids)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - floor
    torch.save(student.grad[0, :64].clone(), grad_file)
    return {"seconds": seconds, "peak": peak, "loss": loss.item()}


def train_steps(moe: str, data: str) -> None:
    import statistics

    import yaml

    from moefy import api
    from moefy.train.recipe import Distill, Stage, TrainRecipe

    recipe = TrainRecipe(stages=[Stage(name="kd", trainable="experts", tokens=10 * 4 * 256, seq_len=256,
                                       batch_size=4, lr=1e-4, warmup_steps=1, distill=Distill(temperature=2.0))],
                         checkpoint_every=1000)
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "r.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
        api.train(Path(moe), data, Path(work) / "r.yaml", Path(work) / "run")
        steps = [json.loads(line) for line in (Path(work) / "run" / "metrics.jsonl").read_text().splitlines()]
    rate = statistics.median(r["tokens_per_s"] for r in steps[1:])
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB; median "
          f"{rate:.1f} tokens/s over steps 2-{len(steps)}; distillation loss at step 1 {steps[0]['distill_loss']:.7f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--train", metavar="MOE_DIR", help="train this MoE for 10 distillation steps instead")
    parser.add_argument("--data", help="the training corpus for --train")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--grad-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train:
        train_steps(args.train, args.data)
        return
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.seq_len, args.vocab, args.temperature, args.grad_file)))
        return
    import torch

    gib = 2 ** 30
    copy = args.batch * args.seq_len * args.vocab * 4
    print(f"logits {args.batch} x {args.seq_len} x {args.vocab} fp32: {copy / gib:.2f} GiB per copy")
    results, grads = {}, {}
    with tempfile.TemporaryDirectory() as work:
        for variant in VARIANTS:
            grads[variant] = str(Path(work) / f"{variant}.pt")
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--grad-file", grads[variant],
                                  "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--vocab",
                                  str(args.vocab), "--temperature", str(args.temperature)],
                                 check=True, capture_output=True, text=True).stdout
            results[variant] = json.loads(out.strip().splitlines()[-1])
            r = results[variant]
            print(f"{variant:19s} peak +{r['peak'] / gib:.2f} GiB ({r['peak'] / copy:.1f} copies), "
                  f"{r['seconds']:.2f} s, loss {r['loss']:.6f}")
        diff = (torch.load(grads["formula"]) - torch.load(grads["chunked"])).abs().max().item()
    for before, after in (("formula", "chunked"), ("formula+lm-autograd", "chunked+lm-logged")):
        f, c = results[before], results[after]
        print(f"{after} / {before}: peak {c['peak'] / f['peak']:.2f}x, time {c['seconds'] / f['seconds']:.2f}x")
    print(f"formula vs chunked: max |grad difference| {diff:.2e} (first 64 rows)")


if __name__ == "__main__":
    main()
