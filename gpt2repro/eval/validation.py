"""Validation loss and perplexity over a fixed set of windows, summed over every process."""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from .device import reduce_sum


@torch.no_grad()
def validation_loss(loss_fn, batches, all_reduce=None, device=None, forwards: int = 0, blank=None) -> float:
    """Mean cross-entropy over all validation windows of all ranks.

    `loss_fn(x, y)` returns the mean loss of one (B, T) batch; `batches` is this rank's share of the
    windows. Each batch counts with its B windows, so unequal shares across ranks weigh correctly.
    `device` holds the totals of a rank that has no batches (all ranks must join the reduction).
    With `forwards`, a rank with fewer batches calls `loss_fn(*blank)` (counted nowhere) until it has
    made that many calls, as sharded models need every rank to.
    """
    total, windows = None, 0
    batches = list(batches)
    for x, y in batches:
        loss = loss_fn(x, y).detach().double() * x.size(0)
        total = loss if total is None else total + loss
        windows += x.size(0)
    for _ in range(forwards - len(batches)):
        loss_fn(*blank)
    if total is None:
        total = torch.zeros((), dtype=torch.float64, device=device)
    totals = reduce_sum(torch.stack([total, torch.tensor(float(windows), dtype=torch.float64, device=total.device)]), all_reduce)
    loss_sum, count = totals.tolist()
    if not count:
        raise UserError("no validation windows to evaluate")
    return loss_sum / count


def perplexity(loss: float) -> float:
    """exp(mean cross-entropy in nats); inf where exp overflows."""
    return math.exp(loss) if loss < 700 else math.inf
