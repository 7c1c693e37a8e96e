"""Training losses: cross-entropy with optional knowledge distillation (Hinton et al. 2015)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["distillation_loss", "kd_kl"]


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Return ``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` averaged over the batch.

    The ``T^2`` factor keeps the soft-target gradients on the same scale as the hard-label
    ones when ``T`` changes (Hinton et al. 2015, Section 2). Computed in float32 so that
    autocast half precision cannot overflow the softmax.
    """
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def distillation_loss(
    student_logits: Tensor,
    targets: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    alpha: float = 0.0,
    temperature: float = 4.0,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Return ``(total, ce, kd)`` where ``total = (1 - alpha) * ce + alpha * kd``.

    ``ce`` is the (label-smoothed) cross-entropy on the hard labels and ``kd`` the
    temperature-scaled KL to the teacher (see :func:`kd_kl`). Without a teacher ``kd`` is
    None and ``total`` is just ``ce``.
    """
    ce = F.cross_entropy(student_logits.float(), targets, label_smoothing=label_smoothing)
    if teacher_logits is None:
        return ce, ce, None
    kd = kd_kl(student_logits, teacher_logits, temperature)
    return (1.0 - alpha) * ce + alpha * kd, ce, kd
