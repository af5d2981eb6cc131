"""The rollout record that travels from rollout workers to reward pools and the learner.

One ``Trajectories`` holds B sampled videos (contiguous groups of G per prompt) with everything the learner
needs to recompute a transition's log-prob and the distillation target: the whole latent path, the σ
schedule, the old log-probs, the PRM process rewards (with a mask of where the PRM was evaluated), the
guided means at guided steps only, the final x̂0 the outcome rewards score, and the weight version the
samples were drawn with (so the learner and the driver can measure staleness).

``to_dict``/``from_dict`` give a flat dict of tensors plus a few plain values, which crosses the Ray object
store without pickling custom classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Sequence

import torch
from torch import Tensor

from euphonium_ray.models.base import TextConditioning
from euphonium_ray.errors import EuphoniumError

__all__ = ["Trajectories", "TrajectoryError", "group_rows"]

_COND_PREFIX = "cond."
_OPTIONAL = ("process_rewards_next", "process_evaluated_next", "guided_rows", "guided_means", "guidance_shifts")


def group_rows(groups: Sequence[int] | Tensor, group_size: int) -> Tensor:
    """The batch rows of whole groups (groups are contiguous blocks of ``group_size`` rows), in group order."""
    g = torch.as_tensor(groups, dtype=torch.long).reshape(-1)
    return (g.unsqueeze(1) * group_size + torch.arange(group_size)).reshape(-1)


class TrajectoryError(EuphoniumError, ValueError):
    """A trajectory batch that is inconsistent (shapes, groups) or cannot be combined with another."""


@dataclass
class Trajectories:
    """B trajectories of N transitions each; tensors are on one device, latents fp32.

    Shapes: ``latents`` (B, N+1, C, T, h, w) = x_0 … x_N; ``sigmas`` (N+1,); ``log_probs`` (B, N) old
    log-probs of x_{k+1} given x_k; ``process_rewards`` / ``process_evaluated`` (B, N); ``guidance_norms``
    (B, N) per-sample norm of the PRM gradient used (0 off-window); ``guided_steps`` (M,) the steps where a
    guidance shift was applied (the same for every sample), ``guided_means`` (B, M, C, T, h, w) the guided
    mean μ_guided,old(x_k) at those steps and ``guidance_shifts`` (B, M, C, T, h, w) = μ_guided − μ_unguided;
    ``x0_hat_final`` (B, C, T, h, w) the x̂0 predicted at the last step (what the outcome rewards score);
    ``group_ids`` / ``prompt_indices`` / ``sample_seeds`` (B,) long.

    Optional (None when the run does not need them): ``process_rewards_next`` / ``process_evaluated_next`` (B, N)
    the process reward of each windowed transition's OUTPUT x_{k+1} (for process credit at the output, see
    ``AdvantageConfig.process_credit``); ``guided_rows`` (B,) bool, which members were guided (``rgg.guided_fraction``).
    """

    latents: Tensor
    sigmas: Tensor
    log_probs: Tensor
    process_rewards: Tensor
    process_evaluated: Tensor
    guidance_norms: Tensor
    guided_steps: Tensor
    x0_hat_final: Tensor
    group_ids: Tensor
    prompt_indices: Tensor
    sample_seeds: Tensor
    cond: TextConditioning
    captions: list[str] = field(default_factory=list)
    group_size: int = 1
    weight_version: int = 0
    guided_means: Tensor | None = None
    guidance_shifts: Tensor | None = None
    process_rewards_next: Tensor | None = None
    process_evaluated_next: Tensor | None = None
    guided_rows: Tensor | None = None

    def __post_init__(self) -> None:
        self.validate()

    # --------------------------------------------------------------------------------------------- shape
    @property
    def batch_size(self) -> int:
        return int(self.latents.shape[0])

    @property
    def num_steps(self) -> int:
        """N, the number of transitions per trajectory."""
        return int(self.latents.shape[1]) - 1

    @property
    def num_groups(self) -> int:
        return self.batch_size // self.group_size

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.latents.shape[2:])

    @property
    def states(self) -> Tensor:
        """x_k for every transition: (B, N, C, T, h, w) (a view)."""
        return self.latents[:, :-1]

    @property
    def next_states(self) -> Tensor:
        """x_{k+1} for every transition: (B, N, C, T, h, w) (a view)."""
        return self.latents[:, 1:]

    def guided_mask(self) -> Tensor:
        """Bool (N,): which transitions carry a guided-mean target."""
        mask = torch.zeros(self.num_steps, dtype=torch.bool, device=self.latents.device)
        mask[self.guided_steps.to(mask.device)] = True
        return mask

    def validate(self) -> None:
        """Raise TrajectoryError naming the first field whose shape disagrees with the latents."""
        if self.latents.ndim < 3:
            raise TrajectoryError(f"latents must be (B, N+1, ...), got shape {tuple(self.latents.shape)}")
        b, n = self.batch_size, self.num_steps
        expect: dict[str, tuple[int, ...]] = {
            "sigmas": (n + 1,),
            "log_probs": (b, n),
            "process_rewards": (b, n),
            "process_evaluated": (b, n),
            "guidance_norms": (b, n),
            "x0_hat_final": (b, *self.latent_shape),
            "group_ids": (b,),
            "prompt_indices": (b,),
            "sample_seeds": (b,),
        }
        for name, shape in (("process_rewards_next", (b, n)), ("process_evaluated_next", (b, n)), ("guided_rows", (b,))):
            if getattr(self, name) is not None:
                expect[name] = shape
        m = int(self.guided_steps.numel())
        for name in ("guided_means", "guidance_shifts"):
            if getattr(self, name) is not None:
                expect[name] = (b, m, *self.latent_shape)
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise TrajectoryError(f"Trajectories.{name} has shape {got}, expected {shape}")
        if len(self.cond) != b:
            raise TrajectoryError(f"Trajectories.cond has {len(self.cond)} rows, expected {b}")
        if self.captions and len(self.captions) != b:
            raise TrajectoryError(f"Trajectories.captions has {len(self.captions)} entries, expected {b}")
        if self.group_size < 1 or b % self.group_size != 0:
            raise TrajectoryError(f"batch of {b} trajectories is not a whole number of groups of {self.group_size}")

    # ------------------------------------------------------------------------------------------ slicing
    def _tensor_fields(self) -> list[str]:
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), Tensor)]

    def select(self, rows: Tensor | list[int] | slice) -> "Trajectories":
        """Rows of the batch (whole groups are the caller's business; ``group_size`` is kept). Every row in order
        is the batch itself (its tensors shared, not copied: a 128-video latent path is over 100 MB)."""
        if isinstance(rows, slice):
            idx = torch.arange(self.batch_size)[rows]
        else:
            idx = torch.as_tensor(rows, dtype=torch.long)
        if idx.numel() == self.batch_size and torch.equal(idx.cpu(), torch.arange(self.batch_size)):
            return replace(self, captions=list(self.captions))
        per_sample = {
            name: getattr(self, name)[idx.to(getattr(self, name).device)]
            for name in self._tensor_fields()
            if name not in ("sigmas", "guided_steps")
        }
        captions = [self.captions[i] for i in idx.tolist()] if self.captions else []  # one device read, not B
        group_size = self.group_size if len(idx) % self.group_size == 0 else 1
        return replace(self, **per_sample, cond=self.cond.index(idx.to(self.cond.prompt_embeds.device)),
                       captions=captions, group_size=group_size)

    def select_groups(self, groups: Tensor | list[int]) -> "Trajectories":
        """Whole groups by group position (0 … num_groups−1), keeping their rows contiguous."""
        return self.select(group_rows(groups, self.group_size))

    def split_groups(self, parts: int) -> list["Trajectories"]:
        """Split into ``parts`` batches of whole groups, as evenly as possible (empty parts dropped)."""
        chunks = torch.arange(self.num_groups).tensor_split(parts)
        return [self.select_groups(c) for c in chunks if c.numel() > 0]

    @staticmethod
    def cat(items: list["Trajectories"]) -> "Trajectories":
        """Concatenate batches sampled with the same schedule, group size and guidance window."""
        if not items:
            raise TrajectoryError("cannot concatenate an empty list of trajectory batches")
        if len(items) == 1:  # one rollout worker: nothing to copy
            return replace(items[0], captions=list(items[0].captions))
        first = items[0]
        for other in items[1:]:
            if other.group_size != first.group_size:
                raise TrajectoryError(f"group sizes differ: {first.group_size} vs {other.group_size}")
            if not torch.equal(other.sigmas.cpu(), first.sigmas.cpu()):
                raise TrajectoryError("trajectory batches were sampled with different σ schedules")
            if not torch.equal(other.guided_steps.cpu(), first.guided_steps.cpu()):
                raise TrajectoryError("trajectory batches were sampled with different guidance windows")
        cat = {
            name: torch.cat([getattr(t, name) for t in items])
            for name in first._tensor_fields()
            if name not in ("sigmas", "guided_steps")
        }
        return replace(
            first,
            **cat,
            cond=TextConditioning.cat([t.cond for t in items]),
            captions=[c for t in items for c in t.captions],
            weight_version=min(t.weight_version for t in items),
        )

    def without(self, *names: str) -> "Trajectories":
        """The same batch without the optional per-step tensors ``names`` (``guided_means``, ``guidance_shifts``):
        what a learner that does not read them need not be sent (each is as large as the whole latent path)."""
        unknown = [n for n in names if n not in _OPTIONAL]
        if unknown:
            raise TrajectoryError(f"only optional fields can be left out, not {unknown}")
        return replace(self, **{n: None for n in names})

    def to(self, device: torch.device | str) -> "Trajectories":
        moved = {name: getattr(self, name).to(device) for name in self._tensor_fields()}
        return replace(self, **moved, cond=self.cond.to(device))

    def cpu(self) -> "Trajectories":
        return self.to("cpu")

    # ---------------------------------------------------------------------------------------- transport
    def to_dict(self) -> dict[str, Any]:
        """Flat dict: every tensor by field name, the conditioning as ``cond.*``, plus plain values."""
        out: dict[str, Any] = {name: getattr(self, name) for name in self._tensor_fields()}
        out.update({_COND_PREFIX + k: v for k, v in self.cond.as_dict().items()})
        out["captions"] = list(self.captions)
        out["group_size"] = int(self.group_size)
        out["weight_version"] = int(self.weight_version)
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Trajectories":
        tensor_names = [f.name for f in fields(Trajectories) if f.name not in ("cond", "captions", "group_size",
                                                                                   "weight_version")]
        tensor_names = [n for n in tensor_names if n not in _OPTIONAL or n in d]
        missing = [n for n in tensor_names + [_COND_PREFIX + "prompt_embeds"] if n not in d]
        if missing:
            raise TrajectoryError(f"trajectory dict is missing {missing}")
        cond = TextConditioning.from_dict({k[len(_COND_PREFIX):]: v for k, v in d.items() if k.startswith(_COND_PREFIX)})
        return Trajectories(
            **{n: d[n] for n in tensor_names},
            cond=cond,
            captions=list(d.get("captions", [])),
            group_size=int(d.get("group_size", 1)),
            weight_version=int(d.get("weight_version", 0)),
        )

    def nbytes(self) -> int:
        """Bytes of tensor payload (what a transfer moves)."""
        total = sum(t.numel() * t.element_size() for t in self.to_dict().values() if isinstance(t, Tensor))
        return int(total)
