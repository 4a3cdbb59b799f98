"""An exponential moving average (EMA) of a model's weights, kept next to the model while it trains.

After every optimizer step each floating-point entry of the state_dict (weights and batch-norm statistics) moves
towards the model's: ``average = decay * average + (1 - decay) * weight``. Integer buffers (batch-norm's
``num_batches_tracked``) are copied. Early on the decay is capped at ``(1 + n) / (10 + n)`` after ``n`` updates,
so that the average of a short run is not dominated by the random initial weights: at 2 epochs of 6,000 images
(190 steps of 64) a fixed decay of 0.999 would still hold 83% of the initialisation.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """The EMA of ``model``'s state_dict, held in a copy of the model that can be evaluated and saved as is.

    Args:
        model: the model being trained (unwrapped: not the DistributedDataParallel wrapper).
        decay: the weight of the old average at every step, in (0, 1); the effective decay is
            ``min(decay, (1 + n) / (10 + n))`` at the ``n``-th update.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay must be between 0 and 1, got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model``'s current weights."""
        decay = self.current_decay()
        averages, targets = [], []
        for average, current in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if average.is_floating_point():
                averages.append(average)
                targets.append(current.detach())
            else:
                average.copy_(current)
        if averages:
            # One fused kernel for all tensors: lerp(a, w, 1 - d) = d * a + (1 - d) * w.
            torch._foreach_lerp_(averages, targets, 1.0 - decay)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue the same average, bit for bit."""
        return {
            "decay": self.decay,
            "updates": self.updates,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.updates = state["updates"]
        self.model.load_state_dict(state["model"])
