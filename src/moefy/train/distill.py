"""Distillation from the dense source model (the teacher) into the MoE (the student), one batch at a time."""

from __future__ import annotations

from pathlib import Path

import torch

from moefy.errors import MoefyError
from moefy.models import inference_dtype, load_causal_lm
from moefy.train.recipe import Distill


def load_teacher(dense_dir: Path | None, device: torch.device):
    """The dense model, frozen, in `inference_dtype`."""
    if dense_dir is None:
        raise MoefyError("a distillation stage needs the dense source model, and this MoE's plan names none")
    teacher = load_causal_lm(dense_dir, inference_dtype(device)).to(device)
    teacher.requires_grad_(False)
    return teacher


def distill_loss(teacher, ids: torch.Tensor, student, opts: Distill) -> torch.Tensor:
    """kl_weight · T² · KL(teacher ‖ student) at temperature T, averaged over positions, plus hidden_weight · the
    mean over layers of ‖h_student − h_teacher‖² / ‖h_teacher‖². `student` is the student's model output."""
    with torch.no_grad():
        target = teacher(input_ids=ids, output_hidden_states=opts.hidden_weight > 0)
    t = opts.temperature
    teacher_logp = torch.log_softmax(target.logits.float() / t, dim=-1)
    student_logp = torch.log_softmax(student.logits.float() / t, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean() * t * t
    loss = opts.kl_weight * kl
    if opts.hidden_weight > 0:
        pairs = list(zip(student.hidden_states[1:], target.hidden_states[1:]))
        loss = loss + opts.hidden_weight * sum(
            ((s.float() - h.float()) ** 2).sum() / (h.float() ** 2).sum().clamp_min(1e-12) for s, h in pairs) / len(pairs)
    return loss
