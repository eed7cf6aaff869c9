"""What FSDP (accelerate's FSDP2 plugin, `fully_shard`) changes for the loop. Under FSDP each process holds a shard
of every weight and of the optimizer state, so a checkpoint first gathers full tensors (a collective: every process
calls it), a resume loads the full optimizer state back into the shards, and a stage ends by gathering the weights
into a plain model, which is what LoRA merging, the next stage and the export expect. peft's LoRA wrappers are in the
model before it is sharded, so its adapters shard like any weight; the plain model gets the same wrappers, to take
the gathered adapters by their names and merge them.

Gate noise layers are submodules of the routers, so they are sharded and trained like any weight; they are
training-only, so a stage's gathered model drops them.

Frozen weights kept in the MoE's dtype (`frozen_dtype: source`) are sharded in that dtype beside the float32 ones
that train, and gathered under their stable names, so the plain model takes each in its own dtype.

DeepSpeed is refused: moefy steps, clips and checkpoints through the plain optimizer, not through DeepSpeed's
engine, and a ZeRO-2 run on 2 processes parted from one process and did not resume to the run it left."""

from __future__ import annotations

import torch

from moefy.errors import MoefyError
from moefy.train.gating import NOISE_MODULE
from moefy.train.lora import stable_name


def is_fsdp(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def check_supported(acc) -> None:
    """Refuse, before any work, what does not train right across processes."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:
        raise MoefyError("DeepSpeed is not supported: moefy's steps, clipping and checkpoints do not go through its "
                         "engine, so runs would not match one process or resume; use FSDP (fsdp_version: 2) or DDP "
                         "(docs/scale-out.md)")


def _options(rank0_only: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload with full_state_dict: only rank 0 receives the tensors, the others get empty dicts.
    return StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)


def gather_for_checkpoint(wrapped, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(full weights, full optimizer state keyed by parameter name), on rank 0; collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _options(rank0_only=True)
    return get_model_state_dict(wrapped, options=opts), get_optimizer_state_dict(wrapped, optimizer, options=opts)


def load_optimizer(wrapped, optimizer, state: dict) -> None:
    """Every process read the same checkpoint, so each holds the full state and keeps its own shard of it."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(wrapped, optimizer, state, options=_options(rank0_only=False))


def gathered_weights(wrapped) -> dict[str, torch.Tensor]:
    """Every weight of `wrapped` in full on every process, by its stable name (no upcast's parametrization in it),
    without the training-only noise layers; collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(wrapped, options=_options(rank0_only=False))
    return {stable_name(name): w for name, w in state.items() if NOISE_MODULE not in name}
