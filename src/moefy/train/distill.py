"""Distillation from the dense source model (the teacher) into the MoE (the student), one batch at a time."""

from __future__ import annotations

from pathlib import Path

import torch

from moefy.errors import MoefyError
from moefy.train.frozen import load_frozen
from moefy.train.recipe import Distill


def load_teacher(dense_dir: Path | None, device: torch.device, frozen_dtype: str):
    """The dense model, frozen (frozen.load_frozen)."""
    if dense_dir is None:
        raise MoefyError("a distillation stage needs the dense source model, and this MoE's plan names none")
    return load_frozen(dense_dir, device, frozen_dtype)


# Rows per chunk: 2^24 logits, 64 MB in fp32, whatever the vocabulary.
CHUNK_ELEMENTS = 1 << 24


class ChunkedKL(torch.autograd.Function):
    """T²·Σ_rows KL(softmax(teacher/T) ‖ softmax(student/T)), with its gradient T·(p_student − p_teacher) computed in
    the same pass, a chunk of rows at a time in fp32. Autograd over the plain formula keeps several fp32 copies of
    the vocabulary-wide logits alive at once (each side's upcast, log-softmax and the product): with an 8B model's
    128k vocabulary and 8 × 2,048 tokens, 8.4 GB each. Here the only vocabulary-wide tensor that outlives a chunk
    is the gradient, in the logits' own dtype."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
        vocab = student.shape[-1]
        s, q = student.detach().reshape(-1, vocab), teacher.reshape(-1, vocab)
        grad, sums = torch.empty_like(s), []
        rows = max(1, CHUNK_ELEMENTS // vocab)
        for a in range(0, s.shape[0], rows):
            student_logp = torch.log_softmax(s[a:a + rows].float() / t, dim=-1)
            teacher_logp = torch.log_softmax(q[a:a + rows].float() / t, dim=-1)
            teacher_p = teacher_logp.exp()
            sums.append((teacher_p * (teacher_logp - student_logp)).sum())
            grad[a:a + rows] = (student_logp.exp_() - teacher_p).mul_(t)
        ctx.save_for_backward(grad)
        ctx.shape = student.shape
        return torch.stack(sums).sum() * (t * t)

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * upstream.to(grad.dtype)).view(ctx.shape), None, None


@torch.no_grad()
def logged_lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The mean next-token loss, for the log of a distillation stage whose LM weight is 0: outside autograd and one
    row at a time in fp32, so it keeps no vocabulary-wide log-softmax for a backward that would only carry zeros."""
    total = sum(torch.nn.functional.cross_entropy(logits[r, :-1].float(), ids[r, 1:], reduction="sum")
                for r in range(ids.shape[0]))
    return total / (ids.shape[0] * (ids.shape[1] - 1))


def distill_loss(teacher, ids: torch.Tensor, student, opts: Distill) -> torch.Tensor:
    """kl_weight · T² · KL(teacher ‖ student) at temperature T, averaged over positions, plus hidden_weight · the
    mean over layers of ‖h_student − h_teacher‖² / ‖h_teacher‖². `student` is the student's model output."""
    with torch.no_grad():
        target = teacher(input_ids=ids, output_hidden_states=opts.hidden_weight > 0)
    logits = student.logits
    kl = ChunkedKL.apply(logits, target.logits, opts.temperature) / logits[..., 0].numel()
    loss = opts.kl_weight * kl
    if opts.hidden_weight > 0:
        pairs = list(zip(student.hidden_states[1:], target.hidden_states[1:]))
        loss = loss + opts.hidden_weight * sum(
            ((s.float() - h.float()) ** 2).sum() / (h.float() ** 2).sum().clamp_min(1e-12) for s, h in pairs) / len(pairs)
    return loss
