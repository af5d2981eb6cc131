"""One typed schema for a run: YAML file < upstream environment variables < ``--set a.b=value``.

Every field a user can type lives here, with upstream Euphonium's defaults where upstream has one. Unknown keys
are rejected with the nearest valid name, and bad values fail with one line that names the field.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from euphonium_ray.registry import ORMS, POLICIES, PRMS, Registry, RegistryError, load_plugins
from euphonium_ray.sde import SDE, kl_mode_scale, sigma_schedule
from euphonium_ray.errors import ConfigError
from euphonium_ray.files import read_yaml_mapping


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _registered(registry: Registry, value: str, key: str) -> str:
    """A component name must be in its registry (after the run's ``plugins`` are imported)."""
    if value not in registry:
        raise ValueError(f"unknown {registry.kind} {value!r} for {key}; registered: {', '.join(registry.names())} "
                         "(a plugin module listed under 'plugins' can register more)")
    return value


# --------------------------------------------------------------------------------------------------- sections
class ModelConfig(Section):
    """The policy: a diffusers-layout folder (transformer/, vae/ or latent/, text encoders)."""

    family: str = "hunyuanvideo"  # registry.POLICIES
    path: str = ""
    checkpoint: str | None = None  # a diffusers transformer folder to load over path/transformer
    embedded_guidance: float = 6018.0
    dtype: Literal["fp32", "bf16"] = "bf16"
    trainable: Literal["full", "lora", "none"] = "full"
    lora_rank: int = Field(default=16, ge=1)
    lora_alpha: float = Field(default=16.0, gt=0)
    # The learner's frozen base weights when training LoRA, on GPU: fp32 (default) or bf16, half the memory (under
    # bf16 autocast the matmuls see the same values either way); the adapters and AdamW stay fp32.
    lora_base_dtype: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    # TF32 in fp32 matmuls and convolutions on GPU. Off by default: the rollout and the learner compute the same
    # log-prob at different batch sizes, and TF32's ~1e-3 relative error moves the importance ratio by more than
    # upstream's clip range (1e-4); cuDNN turns it on for convolutions (the patch embedding) unless told not to.
    tf32: bool = False
    # The fast path (issue 15; euphonium_ray/models/hunyuan_fast.py, docs/gpu.md). unpadded_attention: a forward
    # whose rows all have the same prompt length cuts the text padding and runs attention with no mask (the same
    # function; only SDPA's kernel, hence the rounding, may differ). compile: "blocks" compiles each transformer
    # block once (torch.compile, regional) and keeps it across steps and weight versions; it changes rounding
    # (fused kernels), so it is opt-in. merge_lora: rollout copies fold the LoRA adapters into the base weights
    # after every weight sync (one rounding of W0 + s·B·A to model.dtype) instead of running them on every
    # projection; opt-in for the same reason.
    unpadded_attention: bool = True
    compile: Literal["none", "blocks"] = "none"
    merge_lora: bool = False

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        return _registered(POLICIES, v, "model.family")


class DataConfig(Section):
    """Prompt embeddings in upstream's layout (videos2caption.json) and the video shape to sample."""

    prompts: str = ""
    num_frames: int = Field(default=32, ge=1)
    height: int = Field(default=480, ge=8)
    width: int = Field(default=480, ge=8)
    prompts_per_step: int = Field(default=1, ge=1)
    shuffle_seed: int = 1237
    eval_prompts: str | None = None


class SamplerConfig(Section):
    """The SDE sampler (DESIGN.md section 3)."""

    num_steps: int = Field(default=16, ge=1)
    shift: float = Field(default=5.0, gt=0)
    noise_type: Literal["dance", "flow", "ode"] = "dance"
    eta: float = Field(default=0.25, ge=0)
    flow_a: float = Field(default=0.7, ge=0)
    group_size: int = Field(default=8, ge=1)
    same_initial_noise: bool = True
    timestep_arithmetic: Literal["fp64", "fp32"] = "fp64"  # fp32: upstream's σ schedule and int(1000σ) (sde.py)

    def schedule(self) -> Any:
        """The σ schedule (N+1 values, 1 → 0) these settings sample on."""
        return sigma_schedule(self.num_steps, self.shift, self.timestep_arithmetic)

    def sde(self, sigmas: Any = None) -> SDE:
        """The SDE these settings sample with, on ``sigmas`` (default: :meth:`schedule`)."""
        return SDE.on_schedule(self.noise_type, self.eta, self.flow_a, self.schedule() if sigmas is None else sigmas)


class GuidanceWindow(Section):
    """Where and how strongly a reward gradient shifts the sampler's mean.

    ``scale_mode``: ``fixed`` uses ``scale``; ``kl`` derives c = η²/(2β) from the SDE noise (upstream's "KL
    mode"); ``target_ratio`` sets the shift's length per sample and step to ``target_ratio`` times the length of
    that step's noise draw (``std·√D``), along the gradient's direction: a rule that keeps guidance meaningful at
    every noise level and for any reward scale, where a constant is inert in one world and destructive in another.
    ``guided_fraction``: the share of each group that is guided (members 0..m−1, m = round(f·G)); the others
    sample without guidance, so the group's advantages can tell whether guidance helped (with every member
    guided alike, group normalisation cancels a shift common to all of them).
    """

    enabled: bool = True
    scale: float = Field(default=0.01, ge=0)
    scale_mode: Literal["fixed", "kl", "target_ratio"] = "fixed"
    kl_beta: float = Field(default=3.125, gt=0)
    target_ratio: float = Field(default=0.1, gt=0)
    delta_t_scaling: bool = True
    normalize: bool = False
    start: int = Field(default=12, ge=0)
    end: int | None = None  # None: to the last step
    interval: int = Field(default=1, ge=1)
    guided_fraction: float = Field(default=1.0, ge=0, le=1)

    def effective_scale(self, eta: float) -> float:
        """The guidance scale c; "kl" mode derives it from the SDE noise: c = η²/(2β) (``target_ratio`` mode has
        no constant: see ``sde.target_ratio_shift``)."""
        return kl_mode_scale(eta, self.kl_beta) if self.scale_mode == "kl" else self.scale

    def guided_members(self, group_size: int) -> int:
        """How many members of each group are guided."""
        return int(round(self.guided_fraction * group_size))

    @property
    def shifts_anything(self) -> bool:
        """Whether guidance can move a sample at all (a zero scale or no guided member only scores)."""
        if self.guided_fraction == 0:
            return False
        return self.scale_mode != "fixed" or self.scale != 0


class RGGConfig(GuidanceWindow):
    """Reward-gradient guidance from the latent PRM."""


class SPSAConfig(GuidanceWindow):
    """Zeroth-order guidance from the pixel ORM (upstream default: off)."""

    enabled: bool = False
    sigma: float = Field(default=0.01, gt=0)
    num_samples: int = Field(default=1, ge=1)
    kl_beta: float = Field(default=0.3125, gt=0)


class PRMConfig(Section):
    """The process reward model: ``kind`` names it in ``registry.PRMS``. ``latent`` is a trained latent PRM folder
    (``path``); ``oracle`` (toy world only) is the run's own outcome reward of the one-step prediction
    x̂0 = x − σ·v(x), differentiated through the policy: exact because the toy codec is, so it measures what the
    method can do with a perfect PRM."""

    kind: str = "latent"
    path: str = ""
    placement: Literal["colocated", "pool"] = "colocated"
    use_sigmoid: bool = False
    dtype: Literal["fp32", "bf16"] = "bf16"
    micro_batch: int = Field(default=0, ge=0)  # samples per RGG gradient pass (0: the whole batch at once)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        return _registered(PRMS, v, "rewards.prm.kind")


class VLLMJudgeConfig(Section):
    """The vLLM judge's server (``rewards.orm.backend: vllm`` with a model folder as ``path``)."""

    venv: str = ".venv-vllm"  # the environment vLLM runs from (scripts/vllm_env.sh builds it)
    args: list[str] = Field(default_factory=list)  # extra server flags, e.g. [--tensor-parallel-size, "2"]
    startup_timeout_s: float = Field(default=900.0, gt=0)  # for /health to answer
    request_timeout_s: float = Field(default=600.0, gt=0)  # one judge request


class ORMConfig(Section):
    """The pixel-space outcome reward model."""

    enabled: bool = True
    backend: str = "solireward"  # registry.ORMS: a reward task / scorer by name
    path: str = ""
    prompt_variant: Literal["deformity_physics", "ta"] = "deformity_physics"
    num_frames: int = Field(default=8, ge=1)
    image_size: int = Field(default=448, ge=8)
    coef: float = 1.0
    dtype: Literal["fp32", "bf16"] = "bf16"
    # videos per codec decode call in an ORM actor: 1 keeps a full-size VAE's activations at one video's; 0 decodes a
    # whole request at once (a small codec, e.g. the toy world's, whose per-call cost is what dominates)
    decode_batch: int = Field(default=1, ge=0)
    vllm: VLLMJudgeConfig = VLLMJudgeConfig()

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        return _registered(ORMS, v, "rewards.orm.backend")


class RewardsConfig(Section):
    orm: ORMConfig = ORMConfig()
    prm: PRMConfig = PRMConfig()
    latent_outcome: bool = True  # PRM score of the final x̂0 at t=0, an extra advantage term
    latent_outcome_coef_in_score: float = 0.0  # upstream LATENT_REWARD_IN_TRL_REWARD_COEF
    # stop the run after this many consecutive steps in which every group had a non-finite reward (nothing trains)
    max_failed_steps: int = Field(default=3, ge=1)


class AdvantageConfig(Section):
    """Dual-Reward GRPO advantages (DESIGN.md section 3).

    ``process_credit``: which process reward credits transition k (x_k → x_{k+1}): ``input`` r(x_k) (upstream;
    fixed before the transition's noise is drawn, so its expected policy gradient is zero), ``output`` r(x_{k+1}),
    or ``difference`` r(x_{k+1}) − r(x_k) (the shaping difference: what the transition changed).
    """

    mode: Literal["both", "none", "only"] = "both"
    process_credit: Literal["input", "output", "difference"] = "input"
    combine: Literal["paper", "upstream"] = "paper"
    outcome_weight: float = 1.0
    process_weight: float = 1.0
    latent_outcome_weight: float = 0.0
    clamp: float = Field(default=5.0, gt=0)
    pixel_outcome_weight: float = 0.0  # a separate term on the pixel ORM's own advantage (upstream's "trl")


class OptimConfig(Section):
    """The learner: clipped GRPO on a subset of transitions, AdamW."""

    lr: float = Field(default=1e-6, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(default=1e-8, gt=0)
    grad_clip: float = Field(default=1.0, gt=0)
    clip_range: float = Field(default=1e-4, gt=0)
    timestep_fraction: float = Field(default=0.6, gt=0, le=1)
    timestep_selection: Literal["fraction", "range"] = "fraction"
    range_start: int = Field(default=0, ge=0)
    range_end: int = -1
    range_interval: int = Field(default=1, ge=1)
    train_last_transition: bool = False  # upstream never trains σ_{N-1} → 0
    grad_accum: int = Field(default=4, ge=1)  # samples per optimizer update
    # samples whose selected transitions go through the network in one forward/backward (0: the whole grad_accum
    # chunk; 1: one sample at a time, as upstream, for models whose activations are large)
    samples_per_forward: int = Field(default=0, ge=0)
    epochs: int = Field(default=1, ge=1)
    logprob_reduction: Literal["mean", "sum"] = "mean"
    logprob_mean: Literal["unguided", "guided"] = "unguided"
    logprob_mean_training: Literal["unguided", "guided"] = "unguided"
    kl_coef: float = Field(default=0.0, ge=0)
    kl_form: Literal["gaussian", "upstream"] = "gaussian"  # upstream: mean(Δv²)·Δt/(2η²σ²) (grpo.py)
    distill_coef: float = Field(default=0.0, ge=0)


class TimeoutsConfig(Section):
    """How long the driver and the actors wait before they give up, in seconds."""

    reserve_s: float = Field(default=120.0, gt=0)  # one role's placement group
    start_s: float = Field(default=600.0, gt=0)  # the role actors' model loading, the learner's start
    step_s: float = Field(default=3600.0, gt=0)  # the learner's answer for one step
    weights_s: float = Field(default=600.0, gt=0)  # a weight version's publication; the broadcast group's set-up
    shutdown_s: float = Field(default=120.0, gt=0)  # the learner's stop; the scorers' closing of their servers


class ClusterConfig(Section):
    """Ray placement: how many actors of each role and what each one gets."""

    address: str | None = None  # None: embedded local Ray
    mode: Literal["sync", "async"] = "sync"
    num_rollout_workers: int = Field(default=1, ge=1)
    rollout_gpus: float = Field(default=0.0, ge=0)
    rollout_cpus: float = Field(default=1.0, ge=0)
    num_prm_workers: int = Field(default=1, ge=1)
    prm_gpus: float = Field(default=0.0, ge=0)
    num_orm_workers: int = Field(default=1, ge=1)
    orm_gpus: float = Field(default=0.0, ge=0)
    num_learners: int = Field(default=1, ge=1)
    learner_gpus: float = Field(default=0.0, ge=0)
    learner_cpus: float = Field(default=1.0, ge=0)
    fsdp: bool = False
    num_cpus: int | None = None  # for the embedded Ray only
    object_store_memory: int | None = None
    max_actor_restarts: int = Field(default=2, ge=0)
    max_task_retries: int = Field(default=2, ge=0)
    # learner worker processes lost (killed, node gone) that Ray Train restarts the learner after, each time from
    # the run's newest checkpoint, the driver's kept batches replayed since (0: a lost learner ends the run)
    max_learner_restarts: int = Field(default=2, ge=0)
    resources: dict[str, dict[str, float]] = Field(default_factory=dict)  # role -> custom resources (KubeRay groups)
    # How weights reach the rollout workers (always cast to the rollout dtype on the learner's device, in reused
    # flat buckets; LoRA runs move only the adapters). "auto" resolves to the fastest valid path
    # (``weight_sync_backend``): "cuda_ipc" when one learner and every rollout worker fit on one GPU together
    # (fractional shares: the workers copy device to device from the learner's bucket), "collective" (an NCCL
    # broadcast) when the learner and the rollout workers have whole GPUs each (NCCL refuses two members on one
    # GPU), else (CPU) "object_store" (a pinned host bucket, one ray.put).
    weight_sync: Literal["auto", "object_store", "collective", "cuda_ipc"] = "auto"
    # How a rollout worker checks what it loaded, and what the learner reports as a version's digest: "fingerprint"
    # (default: exact bit-pattern sums + sampled values + layout, milliseconds on the device) or "digest" (debug:
    # the full SHA-256 of the published weights on both sides every step; minutes per step at 13 B parameters).
    weight_check: Literal["fingerprint", "digest"] = "fingerprint"
    timeouts: TimeoutsConfig = TimeoutsConfig()

    def weight_sync_backend(self) -> str:
        """The transport ``weight_sync`` resolves to (see its comment)."""
        if self.weight_sync != "auto":
            return self.weight_sync
        if self.learner_gpus >= 1 and self.rollout_gpus >= 1:
            return "collective"
        colocated = (self.num_learners == 1 and 0 < self.learner_gpus < 1 and 0 < self.rollout_gpus < 1
                     and self.learner_gpus + self.num_rollout_workers * self.rollout_gpus <= 1 + 1e-9)
        return "cuda_ipc" if colocated else "object_store"


class OutputConfig(Section):
    dir: str = "outputs/run"
    save_every: int = Field(default=25, ge=1)
    sample_every: int = Field(default=25, ge=0)  # 0: no sample videos during the run (the final ones: write_final)
    eval_every: int = Field(default=0, ge=0)
    eval_count: int = Field(default=16, ge=1)  # prompts in the ODE evaluation before/after (and every eval_every)
    eval_samples_per_prompt: int = Field(default=1, ge=1)  # fixed-noise ODE samples per evaluated prompt
    keep_checkpoints: int = Field(default=3, ge=1)
    write_final: bool = True  # after the last step: a checkpoint and sample videos (whatever save/sample_every say)
    tensorboard: bool = True


class ToyConfig(Section):
    """Knobs of the synthetic shapes world (euphonium_ray/toy); unused for real models.

    World: ``frames`` frames of ``size``×``size`` RGB, one shape of (equal-area) radius ``radius``·size moving
    ``speed``·size pixels per frame. Latents: pixel-unshuffle by ``latent_factor``, then ``(x − latent_shift)·
    latent_scale``. The policy/text-encoder widths and the pretraining schedule live here too, so the whole toy
    (task difficulty, sizes, seeds) is set from the config, not from code.
    """

    frames: int = Field(default=8, ge=2)
    size: int = Field(default=24, ge=8)
    shapes: list[str] = Field(default_factory=lambda: ["circle", "square", "triangle"])
    colors: list[str] = Field(default_factory=lambda: ["red", "green", "blue", "yellow"])
    directions: list[str] = Field(default_factory=lambda: ["left", "right", "up", "down"])
    num_prompts: int = Field(default=48, ge=1)
    seed: int = 0
    radius: tuple[float, float] = (0.16, 0.2)  # fraction of size (radius of the equal-area circle)
    speed: tuple[float, float] = (0.035, 0.045)  # fraction of size per frame
    latent_factor: int = Field(default=4, ge=1)
    latent_shift: float = -0.9
    latent_scale: float = 2.5
    # text side (random-init encoders at these widths)
    text_dim: int = Field(default=64, ge=8)
    pooled_dim: int = Field(default=32, ge=4)
    text_layers: int = Field(default=3, ge=3)
    text_max_tokens: int = Field(default=16, ge=4)
    # policy (diffusers HunyuanVideoTransformer3DModel at a tiny config)
    heads: int = Field(default=3, ge=1)
    head_dim: int = Field(default=32, ge=8)
    dual_layers: int = Field(default=2, ge=0)
    single_layers: int = Field(default=2, ge=0)
    refiner_layers: int = Field(default=1, ge=1)
    mlp_ratio: float = Field(default=2.0, gt=0)
    # flow-matching pretraining (euphonium-ray toy pretrain)
    pretrain_steps: int = Field(default=4000, ge=1)
    pretrain_batch: int = Field(default=16, ge=1)
    pretrain_lr: float = Field(default=1e-3, gt=0)
    pretrain_warmup: int = Field(default=100, ge=0)
    pretrain_seed: int = 0
    pretrain_sigma: Literal["logit_normal", "schedule"] = "logit_normal"

    @model_validator(mode="after")
    def _ranges_are_ordered(self) -> "ToyConfig":
        for name in ("radius", "speed"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"toy.{name} must be a range [low, high] with 0 < low <= high, got [{lo}, {hi}]")
        if self.size % self.latent_factor:
            raise ValueError(f"toy.size={self.size} is not divisible by toy.latent_factor={self.latent_factor}")
        if self.pooled_dim > self.text_dim:
            raise ValueError(f"toy.pooled_dim={self.pooled_dim} exceeds toy.text_dim={self.text_dim}")
        return self


class RunConfig(Section):
    """A whole run."""

    plugins: list[str] = Field(default_factory=list)  # modules imported first; they register components
    seed: int = 42
    steps: int = Field(default=500, ge=1)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sampler: SamplerConfig = SamplerConfig()
    rgg: RGGConfig = RGGConfig()
    spsa: SPSAConfig = SPSAConfig()
    rewards: RewardsConfig = RewardsConfig()
    advantage: AdvantageConfig = AdvantageConfig()
    optim: OptimConfig = OptimConfig()
    cluster: ClusterConfig = ClusterConfig()
    output: OutputConfig = OutputConfig()
    toy: ToyConfig = ToyConfig()

    @model_validator(mode="after")
    def _windows_fit_the_schedule(self) -> "RunConfig":
        n = self.sampler.num_steps
        for name in ("rgg", "spsa"):
            win: GuidanceWindow = getattr(self, name)
            if not win.enabled:
                continue
            if win.start >= n:
                raise ValueError(f"{name}.start={win.start} is past the last sampling step (sampler.num_steps={n})")
            if win.end is not None and win.end >= 0 and win.end <= win.start:
                raise ValueError(f"{name}.end={win.end} must be greater than {name}.start={win.start}")
            if win.end is not None and win.end > n:
                raise ValueError(f"{name}.end={win.end} is past sampler.num_steps={n}")
        return self

    @model_validator(mode="after")
    def _groups_can_compare(self) -> "RunConfig":
        if self.sampler.group_size < 2:
            raise ValueError(f"sampler.group_size={self.sampler.group_size}: GRPO learns from the differences "
                             "between the samples of a group, so a group of one has zero advantage and trains "
                             "nothing; use 2 or more")
        return self

    @model_validator(mode="after")
    def _oracle_lives_with_the_policy(self) -> "RunConfig":
        if self.rewards.prm.kind == "oracle" and self.rewards.prm.placement != "colocated":
            raise ValueError("rewards.prm.kind='oracle' differentiates through the rollout policy: it needs "
                             "rewards.prm.placement='colocated'")
        return self

    @model_validator(mode="after")
    def _fsdp_trains_full_weights(self) -> "RunConfig":
        if self.cluster.fsdp and self.model.trainable != "full":
            raise ValueError(f"cluster.fsdp=true shards a fully trained policy; model.trainable="
                             f"{self.model.trainable!r} needs cluster.fsdp=false (LoRA adapters are small: DDP)")
        return self

    # ------------------------------------------------------------------------------------------ I/O
    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @property
    def guidance_scale(self) -> float:
        return self.rgg.effective_scale(self.sampler.eta)


# ------------------------------------------------------------------------------------------- overrides
def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_valid_keys(ann, dotted + "."))
    return keys


def _unknown_key_error(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, _valid_keys(RunConfig), n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise _unknown_key_error(key)
        node = child
    node[parts[-1]] = value


def parse_set(item: str) -> tuple[str, Any]:
    """``a.b=value`` with the value read as YAML (so 0.1, true, [1,2] and null work)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set rgg.scale=0.02")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _check_keys(tree: Mapping[str, Any], model: type[BaseModel], prefix: str = "") -> None:
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        field = model.model_fields.get(key)
        if field is None:
            raise _unknown_key_error(dotted)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel) and isinstance(value, Mapping):
            _check_keys(value, ann, dotted + ".")


def _env_source(loc: str, msg: str, origins: Mapping[str, str]) -> str:
    """' (from NAME=value)' when the offending key (or, for a cross-field rule, a key the message names) was set
    by an upstream environment variable."""
    for key, source in origins.items():
        named = re.search(rf"(?<![\w.]){re.escape(key)}(?![\w.])", msg)
        if (loc and (loc == key or loc.startswith(key + "."))) or (not loc and named):
            return f" (from {source})"
    return ""


def _format_validation_error(err: ValidationError, origins: Mapping[str, str] | None = None) -> ConfigError:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = f" (got {got!r})" if not isinstance(got, (dict, list)) and loc else ""
        line = f"{loc}: {msg}{shown}" if loc else msg
        lines.append(line + _env_source(loc, msg, origins or {}))
    return ConfigError("invalid config: " + "; ".join(lines))


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    environ: Mapping[str, str] | None = None,
    use_env: bool = True,
) -> RunConfig:
    """Resolve a run's config: YAML file < upstream env vars < ``--set`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = read_yaml_mapping(path, "config file", empty="(no keys at all); start from configs/toy.yaml")
    _check_keys(tree, RunConfig)
    layers: list[tuple[str, Any]] = []
    origins: dict[str, str] = {}  # config key -> the upstream variable that set it, for error messages
    if use_env:
        from euphonium_ray.upstream_env import UPSTREAM_ENV, env_overrides  # it builds on this module's schema

        layers.extend(env_overrides(environ).items())
        env = os.environ if environ is None else environ
        origins = {key: f"{name}={env[name]!r}" for name, (key, _) in UPSTREAM_ENV.items() if name in env}
    sets = [parse_set(item) for item in (overrides or [])]
    layers.extend(sets)
    for key, value in layers:
        _check_keys(_nest(key, value), RunConfig)
        _set_dotted(tree, key, value)
    for key, _ in sets:  # --set wins over the environment
        origins = {k: v for k, v in origins.items() if not (k == key or k.startswith(key + "."))}
    try:
        load_plugins(tree.get("plugins") or [])
    except RegistryError as exc:
        raise ConfigError(str(exc)) from None
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise _format_validation_error(err, origins) from None


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _set_dotted(out, key, value)
    return out


def env_table_markdown() -> str:
    """The documented mapping of upstream variables (rendered into docs/config.md)."""
    from euphonium_ray.upstream_env import variable_table_markdown

    return variable_table_markdown()
