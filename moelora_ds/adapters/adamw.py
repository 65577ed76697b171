"""`AdamWNoBiasCorrection`: torch's AdamW without bias correction, the paper's `AdamWr` (docs/METHOD.md section 2)."""

from __future__ import annotations

import math

import torch


def _next_step(optimizer: torch.optim.Optimizer, group: dict) -> int:
    """The step number t the next update of `group` will be (1 before its first update)."""
    for param in group["params"]:
        step = optimizer.state.get(param, {}).get("step")
        if step is not None:
            return int(step) + 1
    return 1


class AdamWNoBiasCorrection(torch.optim.AdamW):
    """AdamW with update `p <- p (1 - lr wd) - lr m / (sqrt(v) + eps)` on the raw (uncorrected) moments m, v.

    torch's AdamW divides m by 1 - beta1^t and v by 1 - beta2^t; at step t it is given lr * (1 - beta1^t) /
    sqrt(1 - beta2^t), eps / sqrt(1 - beta2^t) and weight_decay scaled so that lr * weight_decay is unchanged,
    which gives exactly the update above; each group's own values are restored after the step, so
    schedulers and checkpoints see the configured ones. `step` is read from the CPU step counters Adam
    keeps (no device synchronisation).
    """

    @torch.no_grad()
    def step(self, closure=None):
        saved = []
        for group in self.param_groups:
            if not group["params"]:  # ZeRO-3 steps one parameter group at a time, the others empty
                continue
            t = _next_step(self, group)
            beta1, beta2 = group["betas"]
            lr_factor = (1 - beta1 ** t) / math.sqrt(1 - beta2 ** t)
            saved.append((group, group["lr"], group["eps"], group["weight_decay"]))
            group["lr"] = group["lr"] * lr_factor
            group["eps"] = group["eps"] / math.sqrt(1 - beta2 ** t)
            group["weight_decay"] = group["weight_decay"] / lr_factor
        try:
            return super().step(closure)
        finally:
            for group, lr, eps, weight_decay in saved:
                group["lr"], group["eps"], group["weight_decay"] = lr, eps, weight_decay
