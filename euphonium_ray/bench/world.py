"""The toy world a benchmark runs in: model folder, prompt embeddings, held-out split, the tasks' rewards and PRMs.

Two sources, both loaded through the same ``from_pretrained`` paths a user's folders go through:

* ``toy``: the committed toy world — ``euphonium-ray toy build`` output (at ``model.path`` when it is built there,
  else built into the benchmark's work folder, seconds) and the trained toy PRM (``rewards.prm.path``, else the
  committed ``euphonium_ray/toy/assets/prm``);
* ``random``: the same layouts with a randomly initialised transformer and PRM, for exercising the pipeline (CI,
  or before the toy artefacts exist). Its numbers say nothing about which method learns faster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

import torch
from torch import Tensor

from euphonium_ray.config import ConfigError, RunConfig
from euphonium_ray.data import PromptEmbeddingDataset, heldout_split, write_subset_index
from euphonium_ray.models.base import OutcomeRewardModel, TextConditioning
from euphonium_ray.models.hunyuan import set_tf32
from euphonium_ray.registry import ORMS, POLICIES, PRMS

if TYPE_CHECKING:  # the classes are resolved through the registries at run time
    from euphonium_ray.models.hunyuan import HunyuanVideoPolicy
    from euphonium_ray.models.prm import LatentPRM

WorldSource = Literal["toy", "random"]
TOY_ASSETS = Path(__file__).resolve().parents[1] / "toy" / "assets"
COMMITTED_PRM = TOY_ASSETS / "prm"
EMBEDDINGS_INDEX = Path("embeddings") / "videos2caption.json"


@dataclass
class WorldPaths:
    """Where a world's parts are on disk, and where they came from (recorded in the benchmark's JSON)."""

    source: WorldSource
    model_dir: Path
    embeddings: Path
    prm_dir: Path
    provenance: dict[str, str] = field(default_factory=dict)


def _is_built(model_dir: Path) -> bool:
    return (model_dir / "transformer" / "config.json").is_file() and (model_dir / EMBEDDINGS_INDEX).is_file()


def _toy_paths(cfg: RunConfig, work_dir: Path, log: Callable[[str], None]) -> WorldPaths:
    from euphonium_ray.toy.build import build_toy_model

    model_dir = Path(cfg.model.path) if cfg.model.path else work_dir / "toy-model"
    if not _is_built(model_dir):
        model_dir = work_dir / "toy-model"
        if not _is_built(model_dir):
            log(f"building the toy model folder into {model_dir}")
            build_toy_model(model_dir, cfg, log=log)
    candidates = [Path(cfg.rewards.prm.path)] if cfg.rewards.prm.path else []
    candidates.append(COMMITTED_PRM)
    prm_dir = next((p for p in candidates if (p / "config.json").is_file()), None)
    if prm_dir is None:
        raise ConfigError(
            "no trained toy PRM found (looked in " + ", ".join(str(p) for p in candidates)
            + "); train one with `euphonium-ray train-prm`, or run the benchmark with --world random"
        )
    info = {"model_dir": str(model_dir), "prm_dir": str(prm_dir)}
    pretrain_info = model_dir / "transformer" / "pretrain_info.json"
    if pretrain_info.is_file():
        info["pretrain_steps"] = str(json.loads(pretrain_info.read_text()).get("steps", "?"))
    return WorldPaths("toy", model_dir, model_dir / EMBEDDINGS_INDEX, prm_dir, info)


def _random_paths(cfg: RunConfig, work_dir: Path, seed: int, log: Callable[[str], None]) -> WorldPaths:
    """A randomly initialised world in the toy layouts (text side, codec, embeddings, transformer, PRM)."""
    from euphonium_ray.toy.build import build_text_side, codec_for, save_transformer, write_embeddings, write_model_index
    from euphonium_ray.toy.data import ShapesWorld
    from euphonium_ray.toy.pretrain import new_transformer

    out = (work_dir / f"random-world-{seed}").resolve()
    prm_dir = out / "prm"
    if not (_is_built(out) and (prm_dir / "config.json").is_file()):
        log(f"building a randomly initialised world into {out}")
        out.mkdir(parents=True, exist_ok=True)
        toy = cfg.toy
        build_text_side(out, toy, None, log)
        codec = codec_for(toy)
        codec.save_pretrained(out / "vae")
        write_model_index(out, toy)
        write_embeddings(out, toy, ShapesWorld(toy))
        channels = codec.latent_shape(toy.frames, toy.size, toy.size)[0]
        transformer = new_transformer(toy, channels, seed)
        save_transformer(transformer, out / "transformer", {"random_init_seed": seed})
        PRMS.component_class("latent").from_policy(transformer, num_dual_blocks=1,
                                                   num_single_blocks=0).save_pretrained(prm_dir)
    return WorldPaths("random", out, out / EMBEDDINGS_INDEX, prm_dir,
                      {"model_dir": str(out), "prm_dir": str(prm_dir), "note": "random init: pipeline check only"})


def prepare_world(cfg: RunConfig, work_dir: str | Path, source: WorldSource,
                  log: Callable[[str], None] = print, seed: int = 0) -> WorldPaths:
    """Make sure the world's folders exist (building what is missing) and say where they are."""
    if cfg.model.family != "toy":
        raise ConfigError(f"the convergence benchmark runs on the toy world: model.family must be 'toy', "
                          f"got {cfg.model.family!r}")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if source == "toy":
        return _toy_paths(cfg, work, log)
    if source == "random":
        return _random_paths(cfg, work, seed, log)
    raise ConfigError(f"world source must be 'toy' or 'random', got {source!r}")


class BenchWorld:
    """Loaded world: prompts (train / held-out split), their embeddings and captions, codec; makes fresh policies,
    and builds each task's reward (``registry.ORMS``) and process reward (``registry.PRMS``), loading a trained
    PRM folder once."""

    def __init__(self, paths: WorldPaths, cfg: RunConfig, heldout_prompts: int, heldout_seed: int,
                 device: str | torch.device = "cpu") -> None:
        self.paths, self.cfg, self.device = paths, cfg, torch.device(device)
        set_tf32(cfg.model.tf32)
        pooled = int(json.loads((paths.model_dir / "transformer" / "config.json").read_text())["pooled_projection_dim"])
        dataset = PromptEmbeddingDataset(paths.embeddings, pooled_dim=pooled)
        self.captions: list[str] = dataset.captions
        n = len(self.captions)
        if not 0 < heldout_prompts < n:
            raise ConfigError(f"heldout_prompts={heldout_prompts} must leave training prompts: the world has {n}")
        self.heldout, self.train = heldout_split(n, heldout_prompts, heldout_seed)
        cond, _ = dataset.conditioning(list(range(n)))
        self.cond_all: TextConditioning = cond.to(self.device, torch.float32).with_captions(self.captions)
        probe = self.load_policy(trainable="none")
        self.codec = probe.codec
        self.latent_shape = tuple(self.codec.latent_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width))
        self._latent_prms: dict[str, LatentPRM] = {}

    def load_policy(self, trainable: Literal["full", "lora", "none"] = "full", seed: int = 0) -> HunyuanVideoPolicy:
        """A fresh copy of the base policy (fp32 master weights), read from the model folder; LoRA adapters are
        drawn from ``seed`` (the run's seed)."""
        m = self.cfg.model
        return POLICIES.get(m.family).from_pretrained(
            self.paths.model_dir, dtype=torch.float32, device=self.device, checkpoint=m.checkpoint,
            trainable=trainable, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha, lora_seed=seed,
            embedded_guidance=m.embedded_guidance,
        )

    def reward(self, cfg: RunConfig) -> OutcomeRewardModel:
        """The task reward ``rewards.orm.backend`` names."""
        return ORMS.build(cfg.rewards.orm.backend, cfg, self.device)

    def process_reward(self, cfg: RunConfig, policy: object = None):
        """The run's PRM: a trained latent PRM (``rewards.prm.path``, else the world's default, loaded once and
        shared by the runs that use it) or the oracle around ``policy``."""
        if cfg.rewards.prm.kind != "latent":
            return PRMS.build(cfg.rewards.prm.kind, cfg, self.device, policy=policy, codec=self.codec)
        # a random world has one random PRM for every task (a pipeline check); the toy world uses the task's own
        path = str(self.paths.prm_dir) if self.paths.source == "random" else (cfg.rewards.prm.path or str(self.paths.prm_dir))
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"no trained PRM at {path} (rewards.prm.path of task reward {cfg.rewards.orm.backend!r}); "
                              f"train one with `euphonium-ray train-prm --orm {cfg.rewards.orm.backend}`")
        if path not in self._latent_prms:
            self._latent_prms[path] = PRMS.component_class("latent").from_pretrained(
                path, device=self.device, dtype=torch.float32).requires_grad_(False)
        return self._latent_prms[path]

    def conditioning(self, prompt_indices: list[int], repeats: int = 1) -> tuple[TextConditioning, list[str]]:
        """Rows of ``prompt_indices``, each repeated ``repeats`` times (contiguous groups), and their captions."""
        cond = self.cond_all.index(prompt_indices).repeat_interleave(repeats)
        return cond, [self.captions[i] for i in prompt_indices for _ in range(repeats)]

    def decode_and_score(self, orm: OutcomeRewardModel, latents: Tensor, captions: list[str]) -> Tensor:
        """Task reward (B,) of latents decoded to pixels."""
        return orm.score(self.codec.decode(latents), captions).float()

    def write_prompt_index(self, path: str | Path, prompt_indices: list[int]) -> Path:
        """A ``videos2caption.json`` of just these prompts (absolute paths), e.g. the training prompts for the driver,
        whose dataset index i is then ``prompt_indices[i]`` of this world."""
        return write_subset_index(self.paths.embeddings, path, prompt_indices)

    def heldout_noise(self, samples_per_prompt: int, seed: int) -> Tensor:
        """The fixed initial noise of held-out evaluation: one draw per (prompt, sample), same for every method."""
        b = len(self.heldout) * samples_per_prompt
        g = torch.Generator().manual_seed(seed)
        return torch.randn((b, *self.latent_shape), generator=g).to(self.device)
