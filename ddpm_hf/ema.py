"""An exponential moving average of the weights that a skipped step leaves untouched, without
the host ever waiting for the device to know whether the step was skipped.

The decay follows `diffusers.training_utils.EMAModel` with ``use_ema_warmup=True``: after n
applied updates it is ``1 - (1 + (n - 1) / inv_gamma) ** -power``, capped at ``max_decay``, and
0 for the first update (the average starts as a copy of the weights). EMAModel keeps n as a
Python integer and so cannot skip an update whose flag is still on the device; here n is a
device tensor and each update is weighted by the step's ``applied`` flag (0 or 1).
"""

from __future__ import annotations

import torch


class ExponentialMovingAverage:
    def __init__(self, parameters, max_decay: float = 0.9999, inv_gamma: float = 1.0, power: float = 0.75):
        self.shadow = [p.detach().clone().float() for p in parameters]
        self.max_decay, self.inv_gamma, self.power = max_decay, inv_gamma, power
        device = self.shadow[0].device
        # float64 keeps 1 - decay accurate near 0.9999 (MPS has no float64; float32 is close enough there).
        self.applied_updates = torch.zeros((), device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)

    def decay(self) -> torch.Tensor:
        """The decay of the update that brought the count to ``applied_updates`` (EMAModel.get_decay)."""
        warmed = (self.applied_updates - 1).clamp(min=0)
        decay = (1 - (1 + warmed / self.inv_gamma) ** -self.power).clamp(max=self.max_decay)
        return torch.where(warmed > 0, decay, torch.zeros_like(decay))

    @torch.no_grad()
    def update(self, parameters, applied: torch.Tensor) -> None:
        """shadow <- shadow - applied * (1 - decay) * (shadow - weights), on the device."""
        self.applied_updates += applied.to(self.applied_updates.dtype)
        drift = torch._foreach_sub(self.shadow, [p.detach() for p in parameters])
        torch._foreach_mul_(drift, applied.float() * (1 - self.decay()).float())
        torch._foreach_sub_(self.shadow, drift)

    @torch.no_grad()
    def copy_to(self, parameters) -> None:
        for shadow, parameter in zip(self.shadow, parameters):
            parameter.copy_(shadow)

    def state_dict(self) -> dict:
        return {"shadow": [s.detach().cpu() for s in self.shadow], "applied_updates": int(self.applied_updates.item()),
                "max_decay": self.max_decay, "inv_gamma": self.inv_gamma, "power": self.power}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"the EMA state holds {len(state['shadow'])} tensors, the model has {len(self.shadow)}")
        for shadow, saved in zip(self.shadow, state["shadow"]):
            shadow.copy_(saved)
        self.applied_updates.fill_(state["applied_updates"])


class LiveWeights:
    """What stands in for the average with --use_ema off: sampling and saving use the live weights."""

    def __init__(self, parameters):
        self.shadow = list(parameters)  # the live tensors themselves, not copies

    def update(self, parameters, applied: torch.Tensor) -> None:
        pass

    @torch.no_grad()
    def copy_to(self, parameters) -> None:
        for live, parameter in zip(self.shadow, parameters):
            parameter.copy_(live)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class AverageSet:
    """Several more EMA lengths tracked beside the main one (improved-diffusion's
    ``--ema_rate 0.9999,0.999``), so one run can be sampled with a short or a long average, or
    the raw weights, after training. Each is an `ExponentialMovingAverage` with the same warm-up
    and its own cap on the decay; each costs one more copy of the weights."""

    def __init__(self, parameters, max_decays: list[float], inv_gamma: float = 1.0, power: float = 0.75):
        parameters = list(parameters)
        self.averages = {decay: ExponentialMovingAverage(parameters, decay, inv_gamma, power) for decay in max_decays}

    def __bool__(self) -> bool:
        return bool(self.averages)

    def items(self):
        return self.averages.items()

    def update(self, parameters, applied: torch.Tensor) -> None:
        parameters = list(parameters)
        for average in self.averages.values():
            average.update(parameters, applied)

    def state_dict(self) -> dict:
        return {str(decay): average.state_dict() for decay, average in self.averages.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {str(decay) for decay in self.averages}:
            raise ValueError(f"the checkpoint holds EMA lengths {sorted(state)}, this run tracks {sorted(map(str, self.averages))}")
        for decay, average in self.averages.items():
            average.load_state_dict(state[str(decay)])


class Guide:
    """Autoguidance's guide (--guide_step): the sampling weights frozen at one step of the run, in a
    UNet of their own that the grids and evaluations after that step sample against. It is part of
    every checkpoint from then on, so a resumed run (or one whose guide/ folder was lost) has it.

    :param make_unet: builds an empty UNet of the run's shape on the run's device (called when the guide is taken or loaded).
    """

    def __init__(self, step: int, make_unet):
        self.step, self.make_unet = step, make_unet
        self.unet = None  # until the run reaches ``step``

    def take(self, sampling_unet) -> None:
        self._hold(sampling_unet.state_dict())

    @torch.no_grad()
    def _hold(self, weights: dict) -> None:
        """A UNet of the run's shape with these weights becomes the guide."""
        self.unet = self.make_unet()
        self.unet.load_state_dict(weights)
        self.unet.eval()

    def state_dict(self) -> dict:
        if self.unet is None:
            return {}
        return {"step": self.step, "weights": {name: tensor.detach().cpu() for name, tensor in self.unet.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        if not state:  # saved before the guide's step
            self.unet = None
            return
        if state["step"] != self.step:
            raise ValueError(f"the checkpoint's guide was taken at step {state['step']}, this run takes it at step {self.step}")
        self._hold(state["weights"])
