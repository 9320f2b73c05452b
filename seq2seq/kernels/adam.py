"""Adam / AdamW on torch's fused kernel, with gradient clipping inside it: the fast engine's
optimizer step.

Why not ``torch.optim``: constructing any of its optimizers imports TorchDynamo (``torch._dynamo``
and sympy, some 800 modules), about 70 MB of resident memory and a second of start-up for a
training loop that compiles nothing. The update here is torch's own fused Adam kernel, the op
``torch.optim.Adam(fused=True)`` runs, so the arithmetic is the same (tests check it step for
step against ``torch.optim``), and the clip factor goes into the kernel as ``grad_scale`` (no
separate pass over the gradients, no host sync). State dicts keep ``torch.optim``'s layout:
checkpoints written by either load into the other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from seq2seq.kernels.compat import fused_adam


class Adam:
    """Adam (Kingma & Ba 2015), or AdamW (Loshchilov & Hutter 2019) with ``decoupled`` weight
    decay, over one group of parameters. ``lr`` may be changed between steps (the schedules do)."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = False) -> None:
        self.params = list(params)
        self.betas, self.eps = betas, eps
        self.weight_decay, self.decoupled = weight_decay, decoupled
        # the fused kernel takes float32 tensors on the CPU or a CUDA device, all on one device
        devices = {p.device for p in self.params}
        self.fused = len(devices) == 1 and all(
            p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in self.params)
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in self.params]
        # ``torch.optim``'s view of the settings: the schedules set ``param_groups[0]["lr"]``, as
        # they would on a torch optimizer
        self.param_groups = [{"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                              "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                              "differentiable": False, "fused": self.fused,
                              "decoupled_weight_decay": decoupled, "params": list(range(len(self.params)))}]

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def _state(self, i: int) -> dict[str, torch.Tensor]:
        state = self.state[i]
        if not state:
            p = self.params[i]
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, grad_scale: torch.Tensor | None = None) -> None:
        """One update; with ``grad_scale`` (a scalar tensor on the parameters' device), every
        gradient is divided by it first, inside the kernel (``clip_scale`` makes one)."""
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        states = [self._state(i) for i in live]
        params = [self.params[i] for i in live]
        grads = [p.grad for p in params]
        avgs, sqs, steps = ([s[k] for s in states] for k in ("exp_avg", "exp_avg_sq", "step"))
        beta1, beta2 = self.betas
        kernel = fused_adam(self.decoupled) if self.fused else None
        if kernel is not None and all(g.dtype == torch.float32 and not g.is_sparse for g in grads):
            torch._foreach_add_(steps, 1)
            kernel(params, grads, avgs, sqs, [], steps, amsgrad=False, lr=self.lr, beta1=beta1, beta2=beta2,
                   weight_decay=self.weight_decay, eps=self.eps, maximize=False, grad_scale=grad_scale)
            return
        for p, g, m, v, n in zip(params, grads, avgs, sqs, steps):
            if grad_scale is not None:
                g.div_(grad_scale)
            _reference_update(p, g, m, v, n, self)

    def state_dict(self) -> dict[str, Any]:
        return {"state": {i: dict(s) for i, s in enumerate(self.state) if s},
                "param_groups": [dict(g) for g in self.param_groups]}

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        """From ``state_dict()`` or from ``torch.optim.Adam``/``AdamW`` over the same parameters."""
        groups = payload["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(f"optimizer state for {sum(len(g['params']) for g in groups)} parameters in "
                             f"{len(groups)} group(s); this model has {len(self.params)} in one")
        group = groups[0]  # its settings win, as in torch.optim (lr: where the schedule had got to)
        self.eps, self.weight_decay = float(group["eps"]), float(group["weight_decay"])
        self.betas = (float(group["betas"][0]), float(group["betas"][1]))
        self.decoupled = bool(group.get("decoupled_weight_decay", self.decoupled))
        self.param_groups[0].update(lr=float(group["lr"]), eps=self.eps, weight_decay=self.weight_decay,
                                    betas=self.betas, decoupled_weight_decay=self.decoupled)
        state = [{} for _ in self.params]
        for key, saved in payload["state"].items():
            i = int(key)
            p = self.params[i]
            if saved["exp_avg"].shape != p.shape:
                raise ValueError(f"optimizer state {i} has shape {tuple(saved['exp_avg'].shape)}; "
                                 f"the parameter has {tuple(p.shape)}")
            state[i] = {"step": torch.as_tensor(saved["step"], dtype=torch.float32).to(p.device).reshape(()),
                        "exp_avg": saved["exp_avg"].to(p.device, p.dtype),
                        "exp_avg_sq": saved["exp_avg_sq"].to(p.device, p.dtype)}
        self.state = state


@torch.no_grad()
def gradient_norm(params: Iterable[nn.Parameter]) -> torch.Tensor:
    """The 2-norm of all gradients together, as ``clip_grad_norm_`` computes it, from one dot
    product per tensor: on the CPU that runs at memory speed, about 2.5x faster than the
    per-tensor norms (and a float32 overflow or a NaN shows as a non-finite result either way)."""
    grads = [p.grad.reshape(-1) for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.stack([torch.dot(g, g) for g in grads]).sum().sqrt()


def clip_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What to divide gradients by so that their norm is at most ``max_norm`` (1 when it already
    is): the reciprocal of ``clip_grad_norm_``'s factor, for ``Adam.step(grad_scale=...)``. Stays
    on the device: no host sync."""
    return ((norm + 1e-6) / max_norm).clamp(min=1.0)


def _reference_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, n: torch.Tensor,
                      opt: Adam) -> None:
    """The same update one tensor at a time, for what the fused kernel does not take."""
    n += 1
    step = int(n.item())
    beta1, beta2 = opt.betas
    if opt.weight_decay:
        if opt.decoupled:
            p.mul_(1 - opt.lr * opt.weight_decay)
        else:
            g = g.add(p, alpha=opt.weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(opt.eps)
    p.addcdiv_(m, denom, value=-opt.lr / (1 - beta1**step))
