"""Distillation terms: a teacher's scores of each row's own group [positive] + negatives, against
the student's cosine similarities of the same pairs.

  kl          KL(teacher || student) over the group: softmax(teacher / teacher_temperature)
              against softmax(cos / temperature), the mean over rows (sentence-transformers'
              DistillKLDivLoss with those two temperatures, without its student_temperature^2
              factor, which would shrink this term 400-fold at temperature 0.05).
  margin_mse  the student's margins cos(q, p) - cos(q, n_i) against the teacher's t_p - t_i, squared
              error averaged over each row's negatives, then over rows (sentence-transformers'
              MarginMSELoss with cosine similarity, when every score is there).

A teacher score that is nan (a slot padded with another row's positive, which no teacher scored)
takes no part: the candidate leaves both distributions, or its margin is not counted. Every term is
a mean over rows with equal weight, so each rank's mean over its rows, averaged by DDP, is the
mean over the global batch, whatever the number of ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

METHODS = ("kl", "margin_mse")


def group_cosines(queries: Tensor, doc_columns: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """(b, C) cosine of each local query with its own group: doc columns c * N + g (normalised)."""
    slots = doc_columns.shape[0] // num_rows
    group = doc_columns.view(slots, num_rows, -1)[:, rows]  # (C, b, d)
    return torch.einsum("bd,cbd->bc", queries, group)


def kl_term(cosines: Tensor, teacher: Tensor, temperature: float, teacher_temperature: float) -> Tensor:
    present = torch.isfinite(teacher)
    student = (cosines / temperature).masked_fill(~present, float("-inf"))
    target = (teacher / teacher_temperature).masked_fill(~present, float("-inf"))
    log_student, log_target = torch.log_softmax(student, dim=1), torch.log_softmax(target, dim=1)
    terms = torch.where(present, log_target.exp() * (log_target - log_student), torch.zeros_like(student))
    return terms.sum(dim=1).mean()


def margin_mse_term(cosines: Tensor, teacher: Tensor) -> Tensor:
    present = torch.isfinite(teacher[:, 1:]) & torch.isfinite(teacher[:, :1])
    student_margin = cosines[:, :1] - cosines[:, 1:]
    teacher_margin = torch.nan_to_num(teacher[:, :1] - teacher[:, 1:])
    squared = torch.where(present, (student_margin - teacher_margin) ** 2, torch.zeros_like(student_margin))
    per_row = squared.sum(dim=1) / present.sum(dim=1).clamp(min=1)
    return per_row.mean()


def rank_agreement(cosines: Tensor, teacher: Tensor) -> Tensor:
    """Spearman's rank correlation of student and teacher over each row's scored group, averaged
    over rows with at least two scored documents (nan if none): do they order the group alike?"""
    present = torch.isfinite(teacher)
    usable = present.sum(dim=1) >= 2
    if not bool(usable.any()):
        return cosines.new_tensor(float("nan"))
    cos, tea, present = cosines[usable].detach().double(), teacher[usable].double(), present[usable]
    # Absent slots rank last on both sides, then drop out of the correlation through the weights.
    cos_ranks = _ranks(cos.masked_fill(~present, float("-inf")))
    tea_ranks = _ranks(tea.masked_fill(~present, float("-inf")))
    weights = present.double()
    count = weights.sum(dim=1, keepdim=True)
    cos_c = (cos_ranks - (cos_ranks * weights).sum(1, keepdim=True) / count) * weights
    tea_c = (tea_ranks - (tea_ranks * weights).sum(1, keepdim=True) / count) * weights
    denominator = (cos_c.pow(2).sum(1) * tea_c.pow(2).sum(1)).sqrt()
    correlation = torch.where(denominator > 0, (cos_c * tea_c).sum(1) / denominator.clamp(min=1e-300), torch.zeros_like(denominator))
    return correlation.mean().to(cosines.dtype)


def _ranks(values: Tensor) -> Tensor:
    return values.argsort(dim=1).argsort(dim=1).to(values.dtype)
