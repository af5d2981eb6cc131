"""``euphonium-ray train-prm``: train a latent process reward model on ORM-labelled rollouts of the base policy.

Recipe (the same for the toy world and a real HunyuanVideo folder):

1. **Rollouts**: the base policy samples G videos per prompt with the run's own SDE sampler (``sampling.py``, no
   guidance), keeping every state x_k at σ_k and the final x̂0 the outcome reward scores.
2. **Labels**: the codec decodes x̂0 and the ORM scores it. Default ``--label score``: the ORM score standardised
   with the training split's mean and std, fitted by MSE. RGG follows the PRM's *gradient* and Dual-Reward GRPO
   ranks its scores within a group, so the PRM must order videos finely, including two passing videos of
   different quality; a regression target keeps that ordering, while pass/fail labels throw it away and a
   saturated sigmoid flattens the gradient on confident samples. ``--label binary`` (ORM ≥ threshold, BCE, as
   PRFL's PAVRM trains on human pass/fail labels) is there for judges whose scores only mean pass/fail.
3. **Noise levels like the sampler's**: each epoch every training rollout gives one trajectory state x_k at its
   own σ_k (k uniform over the sampler's steps: exactly what RGG queries) and one re-noised
   ``(1−σ)·x̂0 + σ·ε`` with σ from the shifted schedule's density (``σ = sτ/(1+(s−1)τ)``, τ uniform; σ = 0, the
   clean latent of the latent-outcome reward, with probability ``clean_fraction``).
4. **Training**: AdamW with a cosine schedule; the backbone (the policy's first blocks) learns at 0.1× the head's
   rate by default: at full rate it memorised a few hundred toy rollouts (held-out MSE worse than a constant),
   frozen it fitted a little less well (both measured; see the PRM's metrics.json). ``--rollouts-file`` keeps the
   sampled, labelled rollouts, so trying another training setting does not sample again.
5. **Held-out rollouts** (whole groups) measure how well the PRM predicts the outcome from each noise level:
   Pearson/Spearman correlation with the ORM score per σ bucket and per sampler step, the within-group
   correlation (what GRPO advantages use) and the MSE against the best constant. They go to ``metrics.json``
   next to ``config.json`` + ``model.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor
from torch.nn import functional as F

from euphonium_ray.config import RGGConfig, RunConfig, SamplerConfig, SPSAConfig
from euphonium_ray.models.base import LatentCodec, OutcomeRewardModel, Policy, ProcessRewardModel, TextConditioning
from euphonium_ray.sampling import make_generators, sample_seed, sample_trajectories

if TYPE_CHECKING:  # the class is resolved through registry.PRMS at run time
    from euphonium_ray.models.prm import LatentPRM

__all__ = [
    "LabelledRollouts",
    "PRMTrainOptions",
    "collect_rollouts",
    "evaluate_prm",
    "load_orm",
    "load_prm_folder",
    "load_rollouts",
    "main",
    "make_labels",
    "save_rollouts",
    "split_groups",
    "train_prm",
]

LabelKind = Literal["score", "binary"]
TRAINED_PRM_KIND = "latent"  # the registry.PRMS entry whose class train-prm builds from the policy and trains
SIGMA_BUCKETS: tuple[tuple[float, float], ...] = ((0.0, 0.0), (0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0))


class PRMTrainOptions(BaseModel):
    """What ``train-prm`` can be told beyond the run config (sampler, seed) it reads."""

    model_config = ConfigDict(extra="forbid")

    rollouts: int = Field(default=384, ge=2)
    # smaller than RL's G = 8: more distinct initial noises for the same rollouts (members share their first
    # noise), and whole groups still let the held-out split and the within-group correlation work
    group_size: int = Field(default=4, ge=1)
    groups_per_batch: int = Field(default=4, ge=1)  # groups sampled together (one policy batch)
    heldout_fraction: float = Field(default=0.25, gt=0, lt=1)
    label: LabelKind = "score"
    threshold: float | None = None  # binary labels: ORM ≥ threshold passes (default: the training median)
    num_dual_blocks: int = Field(default=1, ge=0)
    num_single_blocks: int = Field(default=0, ge=0)
    num_queries: int = Field(default=1, ge=1)
    epochs: int = Field(default=20, ge=1)
    backbone_lr_scale: float = Field(default=0.1, ge=0)  # backbone lr = lr × this; 0 freezes the policy blocks
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=3e-4, gt=0)
    weight_decay: float = Field(default=1e-2, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    clean_fraction: float = Field(default=0.1, ge=0, le=1)
    seed: int = 0


# ------------------------------------------------------------------------------------------------ rollouts
@dataclass
class LabelledRollouts:
    """R rollouts: states x_k at σ_k (R, N, C, T, h, w), the final x̂0 (R, C, T, h, w), the ORM outcome (R,),
    group ids (R,) (contiguous groups), the text conditioning (R rows) and captions."""

    states: Tensor
    sigmas: Tensor
    x0_hat: Tensor
    outcome: Tensor
    group_ids: Tensor
    cond: TextConditioning
    captions: list[str]

    def __len__(self) -> int:
        return int(self.outcome.shape[0])

    def select(self, rows: Tensor) -> "LabelledRollouts":
        return LabelledRollouts(self.states[rows], self.sigmas, self.x0_hat[rows], self.outcome[rows],
                                self.group_ids[rows], self.cond.index(rows), [self.captions[int(i)] for i in rows])


def collect_rollouts(
    policy: Policy,
    codec: LatentCodec,
    orm: OutcomeRewardModel,
    prompts: TextConditioning,
    captions: list[str],
    *,
    sampler: SamplerConfig,
    latent_shape: tuple[int, ...],
    num_rollouts: int,
    group_size: int,
    groups_per_batch: int = 4,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> LabelledRollouts:
    """Sample ``num_rollouts`` (rounded down to whole groups) unguided SDE rollouts, decode x̂0, score with the ORM.

    Prompts are visited in a seeded random order, cycling when there are more groups than prompts; every sample
    has its own generator seeded from (seed, round, prompt, member), so the data set is reproducible.
    """
    num_groups = num_rollouts // group_size
    if num_groups < 2:
        raise ValueError(f"--rollouts {num_rollouts} with --group-size {group_size} gives {num_groups} group(s); need >= 2")
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))
    plan = [(g // len(prompts), int(order[g % len(prompts)])) for g in range(num_groups)]  # (round, prompt)
    no_rgg, no_spsa = RGGConfig(enabled=False), SPSAConfig(enabled=False)
    states, x0s, outcomes, conds, caps = [], [], [], [], []
    for start in range(0, num_groups, groups_per_batch):
        chunk = plan[start : start + groups_per_batch]
        idx = torch.tensor([p for _, p in chunk])
        seeds = [sample_seed(seed, rnd, p, m) for rnd, p in chunk for m in range(group_size)]
        cond = prompts.index(idx).repeat_interleave(group_size)
        batch_caps = [captions[p] for _, p in chunk for _ in range(group_size)]
        traj = sample_trajectories(
            policy, cond, sampler=sampler, rgg=no_rgg, spsa=no_spsa, prm=None, latent_shape=latent_shape,
            group_size=group_size, generator=make_generators(seeds), same_initial_noise=sampler.same_initial_noise,
            captions=batch_caps,
        )
        with torch.no_grad():
            scores = orm.score(codec.decode(traj.x0_hat_final), batch_caps)
        scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1).cpu()
        if scores.numel() != len(batch_caps) or not torch.isfinite(scores).all():
            raise ValueError(f"the ORM returned {scores.tolist()} for {len(batch_caps)} videos; expected finite scores")
        states.append(traj.states.cpu())
        x0s.append(traj.x0_hat_final.cpu())
        outcomes.append(scores)
        conds.append(cond.to("cpu"))
        caps.extend(batch_caps)
        log(f"rollouts {len(caps)}/{num_groups * group_size}: ORM mean {scores.mean():.3f}")
    outcome = torch.cat(outcomes)
    return LabelledRollouts(
        states=torch.cat(states), sigmas=traj.sigmas.cpu(), x0_hat=torch.cat(x0s), outcome=outcome,
        group_ids=torch.arange(len(outcome)) // group_size, cond=TextConditioning.cat(conds), captions=caps,
    )


def save_rollouts(data: LabelledRollouts, path: str | Path) -> None:
    """Keep sampled, labelled rollouts (safetensors; latents in fp16) so training can be re-run without sampling."""
    from safetensors.torch import save_file

    tensors = {"states": data.states.half(), "sigmas": data.sigmas, "x0_hat": data.x0_hat.half(),
               "outcome": data.outcome, "group_ids": data.group_ids,
               **{f"cond.{k}": v.float().contiguous() for k, v in data.cond.as_dict().items()}}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"captions": json.dumps(data.captions)})
    tmp.replace(path)


def load_rollouts(path: str | Path) -> LabelledRollouts:
    """Rollouts written by :func:`save_rollouts`; a damaged file is named in the error."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
            captions = json.loads((f.metadata() or {})["captions"])
        cond = TextConditioning.from_dict({k[5:]: v for k, v in t.items() if k.startswith("cond.")})
        return LabelledRollouts(t["states"].float(), t["sigmas"], t["x0_hat"].float(), t["outcome"], t["group_ids"],
                                cond, captions)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not a rollouts file we wrote
        raise ValueError(f"rollouts file {path} cannot be read ({type(exc).__name__}: {exc})") from None


def split_groups(data: LabelledRollouts, heldout_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Row indices (train, held-out), held-out = whole groups (group members share their first noise)."""
    groups = torch.unique(data.group_ids)
    perm = groups[torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed + 1))]
    n_held = min(max(1, round(heldout_fraction * len(groups))), len(groups) - 1)
    held = torch.isin(data.group_ids, perm[:n_held])
    return torch.nonzero(~held).squeeze(1), torch.nonzero(held).squeeze(1)


def make_labels(outcome: Tensor, kind: LabelKind, train_rows: Tensor, threshold: float | None = None) -> tuple[Tensor, dict[str, Any]]:
    """Targets for every rollout and how they were made (saved in the PRM's config.json as ``label``)."""
    ref = outcome[train_rows]
    if kind == "score":
        mean, std = float(ref.mean()), float(ref.std())
        if not std > 0:
            raise ValueError("every training rollout has the same ORM score; nothing to learn (more rollouts?)")
        return (outcome - mean) / std, {"kind": "score", "mean": mean, "std": std}
    if kind == "binary":
        thr = float(ref.median()) if threshold is None else float(threshold)
        labels = (outcome >= thr).float()
        if labels[train_rows].min() == labels[train_rows].max():
            raise ValueError(f"binary labels at threshold {thr}: every training rollout is on the same side")
        return labels, {"kind": "binary", "threshold": thr, "pass_rate": float(labels[train_rows].mean())}
    raise ValueError(f"label must be 'score' or 'binary', got {kind!r}")


# ------------------------------------------------------------------------------------------------ training
def shifted_sigmas(n: int, shift: float, generator: torch.Generator) -> Tensor:
    """σ drawn like the sampler's grid: τ ~ U(0, 1), ``σ = sτ/(1+(s−1)τ)``."""
    tau = torch.rand(n, generator=generator)
    return shift * tau / (1 + (shift - 1) * tau)


def epoch_examples(data: LabelledRollouts, rows: Tensor, shift: float, clean_fraction: float,
                   generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """One epoch's (latents, σ, rollout row): a trajectory state and a re-noised x̂0 per rollout, shuffled."""
    n_steps = data.states.shape[1]
    k = torch.randint(n_steps, (len(rows),), generator=generator)
    traj_x, traj_s = data.states[rows, k], data.sigmas[k]
    sig = shifted_sigmas(len(rows), shift, generator)
    sig = torch.where(torch.rand(len(rows), generator=generator) < clean_fraction, torch.zeros_like(sig), sig)
    x0 = data.x0_hat[rows]
    eps = torch.randn(x0.shape, generator=generator)
    s5 = sig.view(-1, *([1] * (x0.ndim - 1)))
    renoised = (1 - s5) * x0 + s5 * eps
    latents, sigmas, owners = torch.cat([traj_x, renoised]), torch.cat([traj_s, sig]), torch.cat([rows, rows])
    perm = torch.randperm(len(owners), generator=generator)
    return latents[perm], sigmas[perm], owners[perm]


def train_prm(
    prm: LatentPRM, data: LabelledRollouts, labels: Tensor, train_rows: Tensor, opts: PRMTrainOptions, *,
    shift: float, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """AdamW on MSE (score labels) or BCE-with-logits (binary labels); returns loss history and timing."""
    gen = torch.Generator().manual_seed(opts.seed)
    prm.backbone.requires_grad_(opts.backbone_lr_scale > 0)
    groups = [{"params": [p for n, p in prm.named_parameters() if not n.startswith("backbone.")], "lr": opts.lr}]
    if opts.backbone_lr_scale > 0:
        groups.append({"params": list(prm.backbone.parameters()), "lr": opts.lr * opts.backbone_lr_scale})
    optim = torch.optim.AdamW(groups, weight_decay=opts.weight_decay)
    steps_per_epoch = math.ceil(2 * len(train_rows) / opts.batch_size)
    total = steps_per_epoch * opts.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    loss_fn = F.mse_loss if opts.label == "score" else F.binary_cross_entropy_with_logits
    prm.train()
    t0, history = time.perf_counter(), []
    for epoch in range(opts.epochs):
        latents, sigmas, owners = epoch_examples(data, train_rows, shift, opts.clean_fraction, gen)
        running = 0.0
        for start in range(0, len(owners), opts.batch_size):
            sl = slice(start, start + opts.batch_size)
            rows = owners[sl]
            pred = prm(latents[sl], sigmas[sl], data.cond.index(rows))
            loss = loss_fn(pred, labels[rows].to(pred.device))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in prm.parameters() if p.requires_grad], opts.grad_clip)
            optim.step()
            sched.step()
            running += float(loss.detach()) * len(rows)
        history.append(running / len(owners))
        if epoch == 0 or (epoch + 1) % max(1, opts.epochs // 10) == 0 or epoch + 1 == opts.epochs:
            log(f"epoch {epoch + 1}/{opts.epochs}: train loss {history[-1]:.4f} ({time.perf_counter() - t0:.0f}s)")
    prm.eval()
    return {"loss_history": history, "seconds": time.perf_counter() - t0, "optimizer_steps": total}


# ---------------------------------------------------------------------------------------------- evaluation
def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


def spearman(a: Tensor, b: Tensor) -> float:
    return pearson(a.argsort().argsort().double(), b.argsort().argsort().double())


def _centred_by_group(values: Tensor, groups: Tensor) -> Tensor:
    _, inverse = torch.unique(groups, return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1, dtype=torch.float64).index_add_(0, inverse, values.double())
    counts = torch.bincount(inverse).double()
    return values.double() - (sums / counts)[inverse]


@torch.no_grad()
def score_rows(prm: LatentPRM, latents: Tensor, sigmas: Tensor, cond: TextConditioning, batch: int = 64) -> Tensor:
    return torch.cat([prm(latents[i : i + batch], sigmas[i : i + batch], cond.index(slice(i, i + batch))).cpu()
                      for i in range(0, len(sigmas), batch)])


def _stats(pred: Tensor, outcome: Tensor, labels: Tensor, groups: Tensor, label_kind: LabelKind,
           const: float) -> dict[str, Any]:
    out: dict[str, Any] = {"n": int(len(pred)), "pearson": pearson(pred, outcome), "spearman": spearman(pred, outcome)}
    if len(torch.unique(groups)) < len(groups):
        out["within_group_pearson"] = pearson(_centred_by_group(pred, groups), _centred_by_group(outcome, groups))
    if label_kind == "score":
        out["mse"] = float(((pred - labels) ** 2).mean())
        out["constant_mse"] = float(((const - labels) ** 2).mean())
    else:
        out["bce"] = float(F.binary_cross_entropy_with_logits(pred, labels))
        p = min(max(const, 1e-6), 1 - 1e-6)
        out["constant_bce"] = float(F.binary_cross_entropy(torch.full_like(labels, p), labels))
        out["accuracy"] = float(((pred > 0).float() == labels).float().mean())
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in out.items()}


def evaluate_prm(prm: LatentPRM, data: LabelledRollouts, labels: Tensor, rows: Tensor, label_kind: LabelKind,
                 train_rows: Tensor) -> dict[str, Any]:
    """Correlation of the PRM's score with the outcome on ``rows`` at every trajectory state x_k (σ_k) and at
    the clean x̂0 (σ = 0), per sampler step and per σ bucket (bucket (0,0) is the clean latent)."""
    const = float(labels[train_rows].mean())  # the best constant predictor, fitted on the training split
    n_steps = data.states.shape[1]
    sub = data.select(rows)
    by_step, preds, sigmas = [], [], []
    for k in range(n_steps + 1):
        x = sub.states[:, k] if k < n_steps else sub.x0_hat
        sigma = data.sigmas[k] if k < n_steps else torch.tensor(0.0)
        sig = sigma.expand(len(rows)).clone()
        pred = score_rows(prm, x, sig, sub.cond)
        preds.append(pred)
        sigmas.append(sig)
        by_step.append({"step": k if k < n_steps else "x0_hat", "sigma": round(float(sigma), 4),
                        **_stats(pred, sub.outcome, labels[rows], sub.group_ids, label_kind, const)})
    pred_all, sig_all = torch.cat(preds), torch.cat(sigmas)
    outcome_all, labels_all = sub.outcome.repeat(n_steps + 1), labels[rows].repeat(n_steps + 1)
    groups_all = torch.cat([sub.group_ids * (n_steps + 1) + j for j in range(n_steps + 1)])  # (group, step)
    buckets = []
    for lo, hi in SIGMA_BUCKETS:
        mask = (sig_all == 0) if hi == 0 else (sig_all > lo) & (sig_all <= hi)
        if int(mask.sum()) >= 3:
            buckets.append({"sigma_range": [lo, hi], **_stats(pred_all[mask], outcome_all[mask], labels_all[mask],
                                                               groups_all[mask], label_kind, const)})
    low = (sig_all > 0) & (sig_all <= 0.6)
    summary = _stats(pred_all[low], outcome_all[low], labels_all[low], groups_all[low], label_kind, const) \
        if int(low.sum()) >= 3 else {"n": int(low.sum())}
    # pooled over steps, a σ-dependent offset of the scores lowers the correlation; RGG and per-step advantages
    # only compare latents at the same σ, so the mean of the per-step correlations is reported beside it
    per_step = [r["pearson"] for r in by_step[:n_steps] if 0 < r["sigma"] <= 0.6 and not math.isnan(r["pearson"])]
    summary["mean_per_step_pearson"] = round(sum(per_step) / len(per_step), 5) if per_step else float("nan")
    # what GRPO's group-normalised process advantages and RGG's ranking within a group use (the ranking bar)
    within = [r["within_group_pearson"] for r in by_step[:n_steps]
              if 0 < r["sigma"] <= 0.6 and not math.isnan(r.get("within_group_pearson", math.nan))]
    summary["mean_per_step_within_group_pearson"] = round(sum(within) / len(within), 5) if within else float("nan")
    return {"sigma_le_0.6": summary, "by_sigma_bucket": buckets, "by_step": by_step}


# --------------------------------------------------------------------------------------------------- command
def load_orm(name: str, cfg: RunConfig, device: torch.device | str = "cpu") -> OutcomeRewardModel:
    """The outcome reward ``--orm`` names (``registry.ORMS``: a backend or a reward task), built with the run's
    ``rewards.orm`` settings (path, dtype, ...); the toy tasks use ``cfg.toy``."""
    from euphonium_ray.registry import ORMS

    if name not in ORMS:
        raise ValueError(f"--orm {name!r} is not a registered outcome reward; registered: {', '.join(ORMS.names())}")
    run = cfg.model_copy(deep=True)
    run.rewards.orm.backend = name
    return ORMS.build(name, run, device)


def load_prm_folder(path: str | Path, cfg: RunConfig, device: torch.device | str = "cpu") -> ProcessRewardModel:
    """The trained latent PRM saved in ``path`` (``registry.PRMS["latent"]``), with the run's ``rewards.prm``
    settings (dtype, sigmoid): what ``generate``, ``toy samples`` and ``bench/prm_guidance.py`` guide with."""
    from euphonium_ray.registry import PRMS

    run = cfg.model_copy(deep=True)
    run.rewards.prm.kind, run.rewards.prm.path = "latent", str(path)
    return PRMS.build("latent", run, device)


def is_toy_reward(name: str) -> bool:
    """Whether an outcome reward belongs to the toy world (``toy``, ``toy-<task>``): it reads the world's settings."""
    return name == "toy" or name.startswith("toy-")


def with_model_toy_config(cfg: RunConfig, model_dir: str | Path, log: Callable[[str], None] = print) -> RunConfig:
    """The run config with ``toy`` taken from the model folder's ``toy_config.json`` (written by ``toy build``),
    so the ORM judges the world the model was trained on whatever config the command was given."""
    path = Path(model_dir) / "toy_config.json"
    if not path.is_file():
        return cfg
    from euphonium_ray.config import ToyConfig

    try:
        toy = ToyConfig.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ValueError(f"{path} is not a valid toy world config: {exc}") from None
    if toy != cfg.toy:
        log(f"toy world: using {path} (the model's own world)")
    return cfg.model_copy(update={"toy": toy})


def video_shape(orm_name: str, cfg: RunConfig) -> tuple[int, int, int]:
    """(frames, height, width) of the videos to sample: the toy world's for the toy ORM, else ``data.*``."""
    if is_toy_reward(orm_name):
        return cfg.toy.frames, cfg.toy.size, cfg.toy.size
    return cfg.data.num_frames, cfg.data.height, cfg.data.width


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="euphonium-ray train-prm", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="diffusers-layout model folder (transformer/, vae/)")
    p.add_argument("--prompts", required=True, help="videos2caption.json of precomputed prompt embeddings")
    p.add_argument("--orm", required=True, help="outcome reward (registry.ORMS name, e.g. toy-centered) that labels rollouts")
    p.add_argument("--out", required=True, help="folder for config.json + model.safetensors + metrics.json")
    p.add_argument("--rollouts", type=int, help="number of rollouts (whole groups); default 384")
    p.add_argument("--group-size", type=int, help="videos per prompt and initial noise; default 4")
    p.add_argument("--epochs", type=int, help="passes over the training rollouts; default 20")
    p.add_argument("--label", choices=("score", "binary"), help="regression on the standardised ORM score (default) "
                   "or pass/fail at --threshold (default: the median)")
    p.add_argument("--threshold", type=float, help="binary labels: ORM score that passes")
    p.add_argument("--dual-blocks", type=int, dest="num_dual_blocks", help="policy dual-stream blocks kept (default 1)")
    p.add_argument("--single-blocks", type=int, dest="num_single_blocks", help="single-stream blocks kept (default 0)")
    p.add_argument("--num-queries", type=int, help="learned pooling queries (default 1)")
    p.add_argument("--backbone-lr-scale", type=float, help="backbone lr = lr × this (default 0.1; 0 freezes it)")
    p.add_argument("--rollouts-file", help="labelled rollouts cache: read if it exists, else sample and write it")
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--heldout-fraction", type=float)
    p.add_argument("--seed", type=int, help="default: the run config's seed")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--config", help="run config YAML (sampler, toy world, seed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return p


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def run(args: argparse.Namespace, cfg: RunConfig, opts: PRMTrainOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Rollouts → labels → training → held-out metrics → files. Returns the metrics written."""
    from euphonium_ray.data import PromptEmbeddingDataset, pooled_dim_of
    from euphonium_ray.registry import POLICIES, PRMS

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(opts.seed)
    policy = POLICIES.get(cfg.model.family).from_pretrained(args.model, dtype=torch.float32, device=device,
                                                            trainable="none",
                                                            embedded_guidance=cfg.model.embedded_guidance)
    dataset = PromptEmbeddingDataset(args.prompts, pooled_dim=pooled_dim_of(args.model))
    prompts, captions = dataset.conditioning(range(len(dataset)))
    if is_toy_reward(args.orm):
        cfg = with_model_toy_config(cfg, args.model, log)
    orm = load_orm(args.orm, cfg, device)
    frames, height, width = video_shape(args.orm, cfg)
    latent_shape = tuple(policy.codec.latent_shape(frames, height, width))
    t0 = time.perf_counter()
    if args.rollouts_file and Path(args.rollouts_file).is_file():
        data = load_rollouts(args.rollouts_file)
        log(f"rollouts: {len(data)} read from {args.rollouts_file} (not sampled again)")
    else:
        data = collect_rollouts(policy, policy.codec, orm, prompts.to(device, torch.float32), captions,
                                sampler=cfg.sampler, latent_shape=latent_shape, num_rollouts=opts.rollouts,
                                group_size=opts.group_size, groups_per_batch=opts.groups_per_batch, seed=opts.seed,
                                log=log)
        if args.rollouts_file:
            save_rollouts(data, args.rollouts_file)
    rollout_seconds = time.perf_counter() - t0
    train_rows, held_rows = split_groups(data, opts.heldout_fraction, opts.seed)
    labels, label_info = make_labels(data.outcome, opts.label, train_rows, opts.threshold)
    prm = PRMS.component_class(TRAINED_PRM_KIND).from_policy(
        policy.transformer, opts.num_dual_blocks, opts.num_single_blocks, num_queries=opts.num_queries,
        embedded_guidance=policy.embedded_guidance, use_sigmoid=False,
    )
    prm.requires_grad_(True)
    prm.label = {**label_info, "orm": args.orm}
    data = LabelledRollouts(data.states, data.sigmas, data.x0_hat, data.outcome, data.group_ids,
                            data.cond.to(device), data.captions)
    log(f"{len(data)} rollouts in {rollout_seconds:.0f}s (ORM mean {data.outcome.mean():.3f} ± "
        f"{data.outcome.std():.3f}); training on {len(train_rows)}, holding out {len(held_rows)}")
    training = train_prm(prm, data, labels, train_rows, opts, shift=cfg.sampler.shift, log=log)
    heldout = evaluate_prm(prm, data, labels, held_rows, opts.label, train_rows)
    metrics = {
        "command": "euphonium-ray train-prm " + " ".join(getattr(args, "argv", [])),
        "model": args.model,
        "orm": args.orm,
        "options": opts.model_dump(),
        "sampler": cfg.sampler.model_dump(),
        "latent_shape": list(latent_shape),
        "prm_parameters": sum(p.numel() for p in prm.parameters()),
        "rollouts": {"count": len(data), "train": len(train_rows), "heldout": len(held_rows),
                     "file": args.rollouts_file, "device": str(device),
                     "seconds": round(rollout_seconds, 2), "orm_mean": float(data.outcome.mean()),
                     "orm_std": float(data.outcome.std()), "orm_min": float(data.outcome.min()),
                     "orm_max": float(data.outcome.max())},
        "label": prm.label,
        "training": {"seconds": round(training["seconds"], 2), "optimizer_steps": training["optimizer_steps"],
                     "final_loss": training["loss_history"][-1], "loss_history": training["loss_history"]},
        "heldout": heldout,
    }
    out = Path(args.out)
    prm.to("cpu").save_pretrained(out)
    _write_json(out / METRICS_NAME, metrics)
    return metrics


METRICS_NAME = "metrics.json"


def main(argv: list[str]) -> int:
    """``euphonium-ray train-prm``; exit code 2 for bad input (message names it), 0 on success."""
    from euphonium_ray.config import ConfigError, load_config

    args = _parser().parse_args(argv)
    args.argv = list(argv)
    try:
        cfg = load_config(args.config, args.set)
        given = {k: getattr(args, k) for k in ("rollouts", "epochs", "label", "threshold", "num_dual_blocks",
                                               "num_single_blocks", "num_queries", "backbone_lr_scale", "lr",
                                               "batch_size", "heldout_fraction")}
        given["group_size"] = args.group_size
        opts = PRMTrainOptions(**{k: v for k, v in given.items() if v is not None},
                               seed=cfg.seed if args.seed is None else args.seed)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print("error: " + "; ".join(f"--{'-'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()), file=sys.stderr)
        return 2
    try:
        metrics = run(args, cfg, opts)
    except (ValueError, FileNotFoundError) as exc:  # our loaders' errors (DataError, PolicyLoadError, ...) name the file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    low = metrics["heldout"]["sigma_le_0.6"]
    print(f"wrote {args.out}: held-out correlation with the ORM at 0 < σ ≤ 0.6: {low.get('pearson')} "
          f"(n={low['n']}), within groups per step {low.get('mean_per_step_within_group_pearson')}; "
          f"metrics in {Path(args.out) / METRICS_NAME}")
    return 0
