"""The toy world's calibration: mean ORM of real videos, of the base policy's samples and of a random-init policy.

The base model is meant to sit clearly between the two: plausible (far above noise) but imperfect (far below the
data), so RL has room to climb. All three are scored on the same captions; the two policies sample from the same
seeds with the deterministic ODE sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from euphonium_ray.config import RunConfig
from euphonium_ray.toy.data import ShapesWorld
from euphonium_ray.toy.orm import TERM_NAMES, ORMTerms
from euphonium_ray.toy.samples import caption_judge, generate, load_policy, model_conditioning, sample_captions


@dataclass
class Calibration:
    count: int
    real: dict[str, float]
    base: dict[str, float]
    random_init: dict[str, float]

    def table(self) -> str:
        names = ("score", *TERM_NAMES)
        rows = [f"{'':12s}" + "".join(f"{n:>10s}" for n in names)]
        for label, terms in (("real", self.real), ("base", self.base), ("random-init", self.random_init)):
            rows.append(f"{label:12s}" + "".join(f"{terms[n]:10.3f}" for n in names))
        return "\n".join(rows)


def _means(terms: ORMTerms) -> dict[str, float]:
    return {k: round(float(v.mean()), 4) for k, v in terms.as_dict().items()}


def calibrate(model_dir: str | Path, cfg: RunConfig, *, count: int = 48, seed: int = 0, batch: int = 48,
              device: str = "cpu") -> Calibration:
    """Mean ORM terms of ``count`` videos from each source (captions cycle through the world's prompts)."""
    from euphonium_ray.toy.pretrain import new_transformer

    world = ShapesWorld(cfg.toy)
    orm = caption_judge(cfg)
    base = load_policy(model_dir, device)
    shape = base.codec.latent_shape(cfg.toy.frames, cfg.toy.size, cfg.toy.size)
    # the same (registered) policy class as the base, around a freshly initialised transformer
    random_init = type(base)(new_transformer(cfg.toy, shape[0], seed + 1000).eval().to(device), base.codec,
                             embedded_guidance=base.embedded_guidance)
    random_init.transformer.requires_grad_(False)
    captions = sample_captions(world, count)
    cond = model_conditioning(model_dir, captions, base.pooled_dim)
    outs: dict[str, list[torch.Tensor]] = {"real": [], "base": [], "random_init": []}
    for start in range(0, count, batch):
        caps = captions[start : start + batch]
        c = cond.index(slice(start, start + batch))
        outs["real"].append(world.videos(caps, seed=seed + start))
        outs["base"].append(generate(base, c, cfg, seed + start).cpu())
        outs["random_init"].append(generate(random_init, c, cfg, seed + start).cpu())
    result = {k: _means(orm.score_terms(torch.cat(v), captions)) for k, v in outs.items()}
    return Calibration(count=count, real=result["real"], base=result["base"], random_init=result["random_init"])
