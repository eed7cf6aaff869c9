"""Run `moefy` with every `torch.randn_like` draw (gate noise is the training loop's only one) appended to
$NOISE_DRAWS/rank-N.txt, one line per draw, for tests/test_train_scale.py."""

import os
import sys
from pathlib import Path

import torch

_randn_like = torch.randn_like


def _recorded(like, *args, **kwargs):
    out = _randn_like(like, *args, **kwargs)
    with (Path(os.environ["NOISE_DRAWS"]) / f"rank-{os.environ.get('RANK', '0')}.txt").open("a") as f:
        f.write(" ".join(f"{v:.6e}" for v in out.flatten()[:16].tolist()) + "\n")
    return out


torch.randn_like = _recorded

if __name__ == "__main__":
    from moefy.cli import main

    sys.exit(main(sys.argv[1:]))
