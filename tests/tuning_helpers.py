"""Helpers for the tests of heads that tune CLIP (bottleneck adapters, deep prompts)."""

import torch


def learning_rates(head, steps: int) -> list[float]:
    """The rate of each of ``steps`` optimiser steps under a tuned head's own schedule (from its ``lr``)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=head.lr)
    schedule = head._schedule(optimizer, steps)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates
