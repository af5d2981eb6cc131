"""Several runs of one method trained side by side as one batched network: K seeds on one GPU in about one's time.

A toy-world run on a GPU is bound by kernel launches, not arithmetic: a 1M-parameter DiT on 16 videos leaves an
H200 idle. ``PolicyEnsemble`` stacks the K members' trainable tensors on a leading dimension and runs the
transformer once over all members' rows with ``torch.func.vmap`` over ``functional_call``, so every kernel does K
runs' work. It satisfies the ``Policy`` contract for a batch laid out member-major (K equal blocks of rows), and
everything above it is the ordinary library: ``sample_trajectories`` samples all members' groups at once,
``compute_advantages`` normalises within groups (which never straddle members), and ``grpo_update`` (which
reads ``members``) gives each member its own loss, gradient clipping and statistics. AdamW is elementwise, so one
optimizer over the stacked tensors is K independent optimizers.

Members share the frozen tensors (the base weights under LoRA; nothing under full fine-tuning) and the codec;
their trainable tensors start from their own policies (LoRA adapters drawn from each run's seed).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from euphonium_ray.models.base import TextConditioning

__all__ = ["PolicyEnsemble"]


class PolicyEnsemble:
    """K policies of one architecture as one ``Policy`` over member-major batches (see the module docstring)."""

    def __init__(self, policies: list[Any]) -> None:
        if not policies:
            raise ValueError("an ensemble needs at least one policy")
        self.members = len(policies)
        self.base = policies[0]
        self.codec = self.base.codec
        modules = [p.transformer for p in policies]
        named = [dict(m.named_parameters()) for m in modules]
        trainable = [n for n, t in named[0].items() if t.requires_grad]
        for other in named[1:]:
            if sorted(other) != sorted(named[0]) or [n for n, t in other.items() if t.requires_grad] != trainable:
                raise ValueError("ensemble members must have the same parameters and the same trainable ones")
        self.stacked = {n: nn.Parameter(torch.stack([p[n].detach() for p in named]).contiguous()) for n in trainable}
        self.frozen = {n: t.detach() for n, t in named[0].items() if not t.requires_grad}
        for n, t in self.frozen.items():
            if any(not torch.equal(p[n].detach(), t) for p in named[1:]):
                raise ValueError(f"ensemble members differ in the frozen tensor {n}: they must share one base model")
        self.buffers = dict(modules[0].named_buffers())
        self.transformer = copy.deepcopy(modules[0]).to("meta")  # structure only; tensors come from the dicts

    # ------------------------------------------------------------------------------------------ contract
    @property
    def config(self) -> Any:
        return self.base.config

    @property
    def device(self) -> torch.device:
        return next(iter(self.stacked.values())).device if self.stacked else self.base.device

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.stacked.values())

    def velocity(self, latents: Tensor, sigma: Tensor | float, cond: TextConditioning) -> Tensor:
        """fp32 velocities of a member-major batch: rows ``[m·b, (m+1)·b)`` go through member m."""
        k, total = self.members, latents.shape[0]
        if total % k:
            raise ValueError(f"an ensemble of {k} needs a batch that splits into {k} equal blocks, got {total} rows")
        inputs = self.base.forward_inputs(latents, sigma, cond)
        names = list(inputs)
        split = [inputs[n].reshape(k, total // k, *inputs[n].shape[1:]) for n in names]
        shared = {**self.frozen, **self.buffers}

        def one_member(params: dict[str, Tensor], *args: Tensor) -> Tensor:
            kwargs = dict(zip(names, args))
            return functional_call(self.transformer, {**params, **shared}, (), {**kwargs, "return_dict": False})[0]

        with self.base.autocast(), sdpa_kernel([SDPBackend.MATH]), warnings.catch_warnings():
            # the fused attention kernels have no vmap batching rule (PyTorch loops over the members, and the
            # memory-efficient kernel's backward then fails on CUDA: "LSE is not correctly aligned"); the math
            # form is plain matmuls and softmax, which batch over members
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
            out = vmap(one_member)(self.stacked, *split)
        return out.reshape(total, *out.shape[2:]).float()

    # --------------------------------------------------------------------------------------- members
    def member_state(self, member: int) -> dict[str, Tensor]:
        """Member ``member``'s trainable tensors by the transformer's parameter names (detached views)."""
        return {n: t[member].detach() for n, t in self.stacked.items()}

    def load_member_into(self, policy: Any, member: int) -> Any:
        """Copy member ``member``'s trainable tensors into ``policy`` (a policy of the same architecture)."""
        params = dict(policy.transformer.named_parameters())
        with torch.no_grad():
            for n, t in self.member_state(member).items():
                params[n].copy_(t.to(params[n].dtype))
        return policy
