"""Muon for the hidden conv and linear weights, SGD for the rest, as one torch optimizer (`optim.name=muon`).

timm's `Muon` falls back to AdamW for what it does not orthogonalise, and its Newton-Schulz runs in
bfloat16 (slow and coarse on a CPU without bf16 matrix units); torch's takes 2-D weights only. The
CIFAR speedruns pair Muon with Nesterov SGD, so this optimizer routes each parameter group to one of
two library updates: timm's Newton-Schulz orthogonalisation (in float32 off CUDA) for Muon groups,
torch's functional SGD for the others. Its state is the plain torch optimizer state (a momentum
buffer per parameter), so `state_dict` / `load_state_dict` round-trip exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.optim.muon import get_lr_scale, reshape_for_muon, zeropower_via_newtonschulz
from torch.optim.sgd import sgd

# Keller Jordan's quintic Newton-Schulz coefficients (KellerJordan/Muon, as torch.optim.Muon uses).
NS_COEFFICIENTS = [(3.4445, -4.7750, 2.0315)]


class MuonSGD(torch.optim.Optimizer):
    """Groups with `muon=True` take Muon steps (rate `lr`, momentum, decoupled weight decay, `ns_steps`);
    the others take SGD steps (rate `lr`, momentum, Nesterov, L2 weight decay). A group's `lr_scale`
    says what share of the schedule's rate it takes (the schedule sets `lr` from it)."""

    def __init__(self, groups: list[dict[str, Any]]):
        defaults = {"lr": 0.0, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "muon": False, "ns_steps": 5}
        super().__init__(groups, defaults)
        for group in self.param_groups:
            for param in group["params"]:  # zeros give the same first step as a buffer made from it
                self.state[param]["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every group that has gradients."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            if group["muon"]:
                for param, buf in zip(params, buffers):
                    self._muon_update(param, buf, group)
            elif params:
                sgd(
                    params,
                    [p.grad for p in params],
                    buffers,
                    weight_decay=group["weight_decay"],
                    momentum=group["momentum"],
                    lr=group["lr"],
                    dampening=0.0,
                    nesterov=group["nesterov"],
                    maximize=False,
                )
        return None

    @staticmethod
    def _muon_update(param: torch.Tensor, buf: torch.Tensor, group: dict[str, Any]) -> None:
        grad, momentum, lr = param.grad, group["momentum"], group["lr"]
        assert grad is not None  # step passes only parameters with gradients
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if group["nesterov"] else buf
        matrix, shape = reshape_for_muon(update)  # a conv's (out, in, kh, kw) as (out, in*kh*kw)
        # bfloat16 where tensor cores make it fast; float32 elsewhere (a CPU's bf16 matmul is emulated).
        dtype = torch.bfloat16 if param.is_cuda else torch.float32
        ortho = zeropower_via_newtonschulz(matrix, group["ns_steps"], NS_COEFFICIENTS, dtype=dtype)
        param.mul_(1 - lr * group["weight_decay"])
        # The original Muon's scale, sqrt(max(1, rows / columns)): a wide matrix's update keeps its size.
        param.add_(ortho.reshape(shape).to(param.dtype), alpha=-lr * get_lr_scale(ortho.shape, "original"))
