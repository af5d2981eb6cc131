"""One place that turns ``rewards.orm`` into an OutcomeRewardModel, whichever backend the run names.

``toy`` is the shapes world's analytic judge, ``solireward`` the InternVL + HPQA scorer loaded from a checkpoint
folder, ``vllm`` a vision-language judge behind vLLM's HTTP server (a URL, or a model folder it serves itself).
Backends are imported only when chosen, so a run never pays for (or needs) the others' dependencies.
"""

from __future__ import annotations

import torch

from euphonium_ray.config import ORMConfig, ToyConfig
from euphonium_ray.models.base import OutcomeRewardModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_orm(cfg: ORMConfig, device: torch.device | str = "cpu", toy: ToyConfig | None = None) -> OutcomeRewardModel:
    """The ORM for ``cfg.backend``; ``toy`` carries the shapes world's settings for the ``toy`` backend."""
    if cfg.backend == "toy":
        from euphonium_ray.toy.orm import ToyPixelORM

        return ToyPixelORM.from_config(toy if toy is not None else ToyConfig())
    if cfg.backend == "solireward":
        from euphonium_ray.models.orm_solireward import SoliRewardORM

        if not cfg.path:
            raise ValueError("rewards.orm.path is empty: give the SoliReward checkpoint folder")
        device = torch.device(device)
        dtype = DTYPES[cfg.dtype] if device.type == "cuda" else torch.float32  # bf16 matmuls crawl on CPU
        return SoliRewardORM.from_pretrained(cfg.path, device=device, dtype=dtype, prompt_variant=cfg.prompt_variant,
                                             num_frames=cfg.num_frames, image_size=cfg.image_size)
    if cfg.backend == "vllm":
        from euphonium_ray.models.orm_vllm import VLLMJudgeORM

        return VLLMJudgeORM.from_config(cfg)
    raise ValueError(f"rewards.orm.backend={cfg.backend!r} is not one of: toy, solireward, vllm")


__all__ = ["build_orm"]
