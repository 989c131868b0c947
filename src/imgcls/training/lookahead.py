"""airbench94's lookahead: a slow average of the weights that the fast ones are pulled back to.

Every `every` optimizer steps the average moves towards the current weights (BatchNorm statistics
included) and the weights are then set to it. The average's decay rises with training progress as
`decay * progress**power`, so early on it barely holds the weights back and late in the run it smooths
them strongly; at the last step the weights become the average. Unlike --ema, which only evaluates a
shadow copy, this changes what the optimizer continues from.
"""

from __future__ import annotations

import torch


class Lookahead:
    def __init__(self, model: torch.nn.Module, total_steps: int, every: int = 5, decay: float = 0.95**5,
                 power: float = 3.0):
        self.total_steps, self.every, self.decay, self.power = total_steps, every, decay, power
        self.steps = 0  # optimizer steps taken so far
        self.average = {k: v.detach().clone() for k, v in _averaged(model)}

    def decay_at(self, step: int) -> float:
        return self.decay * (step / self.total_steps) ** self.power

    @torch.no_grad()
    def after_step(self, model: torch.nn.Module) -> None:
        """Called after every optimizer step of the run."""
        self.steps += 1
        step = self.steps
        if step % self.every == 0:
            self._pull(model, self.decay_at(step))
        if step == self.total_steps:  # the final weights are the average (as of the last pull, as airbench)
            self._pull(model, 1.0)

    def _pull(self, model: torch.nn.Module, decay: float) -> None:
        for key, value in _averaged(model):
            average = self.average[key]
            average.lerp_(value, 1.0 - decay)
            value.copy_(average)

    def state_dict(self) -> dict:
        return {"average": self.average, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        for key, value in state["average"].items():
            self.average[key].copy_(value)


def _averaged(model: torch.nn.Module):
    """The floating-point entries of the state dict (weights and BatchNorm statistics, not step counters),
    as airbench averages them."""
    return [(k, v) for k, v in model.state_dict().items() if v.is_floating_point()]
