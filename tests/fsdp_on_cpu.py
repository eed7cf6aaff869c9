"""Run `moefy` with accelerate's FSDP2 plugin on CPU processes (gloo), for tests/test_train_scale.py.

accelerate 1.15 turns ACCELERATE_USE_FSDP on only for GPU-like process groups (accelerate/state.py: the FSDP branch
sits under MULTI_GPU/NPU/XPU/...); on MULTI_CPU it is ignored and the run is plain DDP. torch's fully_shard itself
runs on gloo, so this launcher sets the FSDP2 plugin on the state accelerate built, and the loop then takes exactly
the FSDP path it takes on GPUs: accelerate.prepare -> fully_shard, gathered checkpoints, sharded optimizer state."""

import sys

from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import moefy.train.loop as loop

_make = loop.make_accelerator


def _fsdp_accelerator(recipe):
    acc = _make(recipe)
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    return acc


loop.make_accelerator = _fsdp_accelerator

if __name__ == "__main__":
    from moefy.cli import main

    sys.exit(main(sys.argv[1:]))
