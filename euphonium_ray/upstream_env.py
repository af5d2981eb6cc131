"""Upstream Euphonium's launch-script variables, read with upstream's meaning.

``UPSTREAM_ENV`` maps most of upstream's variables one-to-one onto a config key. Some only mean something
together, because upstream's code combines them; this module reads those (kind ``joint``), so that the variables
of a ported ``train_grpo_hunyuan.sh`` give upstream's sampler and objective:

- RGG runs only when ``PROCESS_LATENT_REWARD_ENABLED``, ``..._SAMPLING_ENABLED`` and
  ``LATENT_REWARD_IN_TRL_REWARD_ENABLED`` are all on (upstream's ``use_process_reward``);
- the objective is upstream's sum of separately clipped terms, one per reward name (``score``, ``trl``,
  ``latent_reward``) plus the process term, with the weights upstream's trainer gives them;
- the training-time guided mean needs ``PROCESS_LATENT_REWARD_TRAINING_ENABLED`` as upstream;
- ``USE_DELTA_T_FOR_GRADIENT_SCALING`` scales SPSA as well as RGG; the KL variables select upstream's KL form.

A joint group is read when one of its variables is set; its unset partners take the launch script's values
(``SCRIPT_VALUES``). It also renders the variable table and the defaults table of docs/config.md.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from euphonium_ray.config import ConfigError, RunConfig

__all__ = ["CHECKED_ONLY", "SCRIPT_VALUES", "UPSTREAM_ENV", "defaults_table_markdown", "env_overrides",
           "joint_overrides", "parse_bool", "variable_table_markdown"]

# --------------------------------------------------------------------------------- upstream environment
# Upstream Euphonium is configured by shell variables; a user moving over keeps them working.
# name -> (dotted key, kind).  Kinds: bool, float, int, str, or a special converter name; "joint": read together
# with other variables by euphonium_ray/upstream_env.py, because upstream's code combines them.
UPSTREAM_ENV: dict[str, tuple[str, str]] = {
    "TRL_CORE_ENABLED": ("rewards.orm.enabled", "bool"),
    "TRL_MODEL_PATH": ("rewards.orm.path", "str"),
    "TRL_PROMPT_VARIANT": ("rewards.orm.prompt_variant", "str"),
    "SCORE_COEF": ("rewards.orm.coef", "float"),
    "HUNYUAN_VIDEO_PATH": ("model.path", "str"),
    "LATENT_REWARD_IN_TRL_REWARD_ENABLED": ("rewards.latent_outcome", "bool"),
    "LATENT_REWARD_IN_TRL_REWARD_COEF": ("rewards.latent_outcome_coef_in_score", "float"),
    "LATENT_REWARD_IN_TRL_REWARD_CHECKPOINT_DIR": ("rewards.prm.path", "str"),
    "LATENT_REWARD_USE_SIGMOID": ("rewards.prm.use_sigmoid", "bool"),
    "PROCESS_LATENT_REWARD_ENABLED": ("rgg.enabled", "joint"),
    "PROCESS_LATENT_REWARD_SAMPLING_ENABLED": ("rgg.enabled", "joint"),
    "PROCESS_LATENT_REWARD_GUIDANCE_SCALE": ("rgg", "scale_or_kl"),
    "PROCESS_LATENT_REWARD_KL_BETA": ("rgg.kl_beta", "float"),
    "PROCESS_LATENT_REWARD_NORMALIZE_GRADIENT": ("rgg.normalize", "bool"),
    "PROCESS_LATENT_REWARD_START_STEP": ("rgg.start", "int"),
    "PROCESS_LATENT_REWARD_END_STEP": ("rgg.end", "end"),
    "PROCESS_LATENT_REWARD_INTERVAL": ("rgg.interval", "int"),
    "USE_DELTA_T_FOR_GRADIENT_SCALING": ("rgg.delta_t_scaling", "bool"),
    "USE_REWARD_GUIDED_MEAN_FOR_LOGPROB": ("optim.logprob_mean", "guided_flag"),
    "USE_REWARD_GUIDED_MEAN_FOR_LOGPROB_TRAINING": ("optim.logprob_mean_training", "joint"),
    "PROCESS_REWARD_ADVANTAGE_MODE": ("advantage.mode", "adv_mode"),
    "PROCESS_REWARD_ADVANTAGE_COEF": ("advantage.process_weight", "joint"),
    "OUTCOME_REWARD_ADVANTAGE_COEF": ("advantage.outcome_weight", "joint"),
    "USE_KL_LOSS": ("optim.kl_coef", "kl_switch"),
    "KL_COEF": ("optim.kl_coef", "kl_coef"),
    "SPSA_REWARD_ENABLED": ("spsa.enabled", "bool"),
    "SPSA_REWARD_SIGMA": ("spsa.sigma", "float"),
    "SPSA_REWARD_GUIDANCE_SCALE": ("spsa", "scale_or_kl"),
    "SPSA_REWARD_NORMALIZE_GRADIENT": ("spsa.normalize", "bool"),
    "SPSA_REWARD_NUM_SAMPLES": ("spsa.num_samples", "int"),
    "SPSA_REWARD_START_STEP": ("spsa.start", "int"),
    "SPSA_REWARD_END_STEP": ("spsa.end", "end"),
    "SPSA_REWARD_INTERVAL": ("spsa.interval", "int"),
    "SPSA_REWARD_KL_BETA": ("spsa.kl_beta", "float"),
    "PROCESS_LATENT_REWARD_TRAINING_ENABLED": ("optim.logprob_mean_training", "joint"),
    "TRL_DTYPE": ("rewards.orm.dtype", "str"),
    "LATENT_REWARD_IN_TRL_REWARD_DTYPE": ("rewards.prm.dtype", "str"),
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(text: str, name: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"{name}: {text!r} is not a boolean (use true/false, 1/0, yes/no, on/off)")


def _number(text: str, name: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a valid {kind.__name__}") from None


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Translate upstream's environment variables into dotted overrides (only those that are set)."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    kl_enabled: bool | None = None
    for name, (key, kind) in UPSTREAM_ENV.items():
        if name not in environ:
            continue
        raw = environ[name]
        if kind == "bool":
            out[key] = parse_bool(raw, name)
        elif kind == "float":
            out[key] = _number(raw, name, float)
        elif kind == "int":
            out[key] = _number(raw, name, int)
        elif kind == "str":
            out[key] = raw
        elif kind == "end":
            end = _number(raw, name, int)
            out[key] = None if end < 0 else end
        elif kind == "scale_or_kl":  # upstream: a negative scale selects "KL mode", c = η²/(2β)
            scale = _number(raw, name, float)
            out[f"{key}.scale_mode"] = "kl" if scale < 0 else "fixed"
            if scale >= 0:
                out[f"{key}.scale"] = scale
        elif kind == "guided_flag":
            out[key] = "guided" if parse_bool(raw, name) else "unguided"
        elif kind == "adv_mode":
            mode = {"0": "none", "1": "only", "2": "both"}.get(raw.strip(), raw.strip().lower())
            out[key] = mode
        elif kind == "kl_switch":
            kl_enabled = parse_bool(raw, name)
        elif kind == "kl_coef":
            out["__kl_coef"] = _number(raw, name, float)
    if kl_enabled is not None:  # USE_KL_LOSS gates KL_COEF (upstream default coefficient 3.125)
        out["optim.kl_coef"] = out.pop("__kl_coef", 3.125) if kl_enabled else 0.0
    out.pop("__kl_coef", None)
    out.update(joint_overrides(environ))
    return out


# upstream scripts/train_grpo_hunyuan.sh at d9f2c39, lines 57-156: the values unset partners of a group take
SCRIPT_VALUES: dict[str, str] = {
    "TRL_CORE_ENABLED": "true",
    "SCORE_COEF": "1.0",
    "LATENT_REWARD_IN_TRL_REWARD_ENABLED": "true",
    "LATENT_REWARD_IN_TRL_REWARD_COEF": "0.0",
    "PROCESS_LATENT_REWARD_ENABLED": "true",
    "PROCESS_LATENT_REWARD_SAMPLING_ENABLED": "true",
    "PROCESS_LATENT_REWARD_TRAINING_ENABLED": "false",
    "PROCESS_REWARD_ADVANTAGE_MODE": "both",
    "PROCESS_REWARD_ADVANTAGE_COEF": "1.0",
    "OUTCOME_REWARD_ADVANTAGE_COEF": "1.0",
    "USE_REWARD_GUIDED_MEAN_FOR_LOGPROB_TRAINING": "false",
}

# variables with no key of their own: checked, so that a value upstream would act on is not silently dropped
CHECKED_ONLY: dict[str, str] = {
    "VIDEO_ALIGN_IN_TRL_REWARD_ENABLED": "must be false: VideoAlign rewards (VQ/MQ/TA terms) are not available here",
    "KL_TYPE": "forward, reverse or symmetric: upstream computes the same KL for all three",
    "KL_WEIGHT_VERSION": "v1 or v2: upstream computes these weights but never applies them",
}

_RGG_SWITCHES = ("PROCESS_LATENT_REWARD_ENABLED", "PROCESS_LATENT_REWARD_SAMPLING_ENABLED")
_LATENT = "LATENT_REWARD_IN_TRL_REWARD_ENABLED"
_OBJECTIVE = ("SCORE_COEF", "LATENT_REWARD_IN_TRL_REWARD_COEF", "PROCESS_REWARD_ADVANTAGE_MODE",
              "PROCESS_REWARD_ADVANTAGE_COEF", "OUTCOME_REWARD_ADVANTAGE_COEF")
_TRAINING_MEAN = ("USE_REWARD_GUIDED_MEAN_FOR_LOGPROB_TRAINING", "PROCESS_LATENT_REWARD_TRAINING_ENABLED")
_MODES = {"0": "none", "1": "only", "2": "both", "none": "none", "only": "only", "both": "both"}


class _Reader:
    """A variable's value from the environment, or the launch script's value when unset."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ

    def raw(self, name: str) -> str:
        return self.environ.get(name, SCRIPT_VALUES[name])

    def flag(self, name: str) -> bool:
        return parse_bool(self.raw(name), name)

    def number(self, name: str) -> float:
        try:
            return float(self.raw(name))
        except ValueError:
            raise ConfigError(f"{name}: {self.raw(name)!r} is not a valid float") from None

    def mode(self) -> str:
        name = "PROCESS_REWARD_ADVANTAGE_MODE"
        mode = _MODES.get(self.raw(name).strip().lower())
        if mode is None:
            raise ConfigError(f"{name}: {self.raw(name)!r} is not an advantage mode (none|only|both or 0|1|2)")
        return mode

    def any_set(self, names: tuple[str, ...]) -> bool:
        return any(n in self.environ for n in names)


def joint_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Dotted overrides for the joint variables that are set (see the module docstring)."""
    env = _Reader(environ)
    out: dict[str, Any] = {}
    if env.any_set(_RGG_SWITCHES):  # upstream sampling.py: use_process_reward needs all three
        out["rgg.enabled"] = all(env.flag(n) for n in (*_RGG_SWITCHES, _LATENT))
    elif _LATENT in environ and not env.flag(_LATENT):  # no latent reward model: nothing to guide with
        out["rgg.enabled"] = False
    if env.any_set(_OBJECTIVE):
        out.update(_objective(env))
    if env.any_set(_TRAINING_MEAN):  # the guided training mean needs a training-time PRM gradient upstream
        names = (*_TRAINING_MEAN, "PROCESS_LATENT_REWARD_ENABLED", _LATENT)
        out["optim.logprob_mean_training"] = "guided" if all(env.flag(n) for n in names) else "unguided"
    if "USE_DELTA_T_FOR_GRADIENT_SCALING" in environ:  # one switch for RGG and SPSA upstream (flux_step.py)
        out["spsa.delta_t_scaling"] = parse_bool(environ["USE_DELTA_T_FOR_GRADIENT_SCALING"],
                                                 "USE_DELTA_T_FOR_GRADIENT_SCALING")
    if "USE_KL_LOSS" in environ or "KL_COEF" in environ:  # KL_COEF is tuned for upstream's form of the KL
        out["optim.kl_form"] = "upstream"
    _check_only(environ)
    return out


def _objective(env: _Reader) -> dict[str, Any]:
    """Upstream's trainer: one clipped term per reward name plus the process term.

    Reward names and their weights (``getattr(args, f"{name}_coef", 1.0)``): ``score`` = SCORE_COEF·trl +
    LATENT_REWARD_IN_TRL_REWARD_COEF·latent with weight SCORE_COEF; ``trl`` (the pixel ORM alone) with weight 1;
    ``latent_reward`` with weight 1 whenever the latent model is on. In mode ``both`` these are multiplied by
    OUTCOME_REWARD_ADVANTAGE_COEF, in ``none`` and ``only`` (its fallback) they are not; the process term has
    weight PROCESS_REWARD_ADVANTAGE_COEF. A component that is switched off simply has no rewards.
    """
    mode = env.mode()
    score_coef = env.number("SCORE_COEF")
    outcome_coef = env.number("OUTCOME_REWARD_ADVANTAGE_COEF") if mode == "both" else 1.0
    return {
        "advantage.mode": mode,
        "advantage.combine": "upstream",
        "advantage.outcome_weight": outcome_coef * score_coef,
        "advantage.pixel_outcome_weight": outcome_coef,
        "advantage.latent_outcome_weight": outcome_coef,
        "advantage.process_weight": env.number("PROCESS_REWARD_ADVANTAGE_COEF"),
        "rewards.orm.coef": score_coef,
        "rewards.latent_outcome_coef_in_score": env.number("LATENT_REWARD_IN_TRL_REWARD_COEF"),
    }


def _check_only(environ: Mapping[str, str]) -> None:
    if "VIDEO_ALIGN_IN_TRL_REWARD_ENABLED" in environ and parse_bool(
            environ["VIDEO_ALIGN_IN_TRL_REWARD_ENABLED"], "VIDEO_ALIGN_IN_TRL_REWARD_ENABLED"):
        raise ConfigError("VIDEO_ALIGN_IN_TRL_REWARD_ENABLED=true: VideoAlign rewards are not available in "
                          "Euphonium-Ray (unset it or set it to false)")
    allowed = {"KL_TYPE": ("forward", "reverse", "symmetric"), "KL_WEIGHT_VERSION": ("v1", "v2")}
    for name, values in allowed.items():
        if name in environ and environ[name].strip().lower() not in values:
            raise ConfigError(f"{name}: {environ[name]!r} is not one of {', '.join(values)}")


# ------------------------------------------------------------------------------------------------ docs
# every variable of the launch script: name -> (our key, meaning). Read from the environment when the name is in
# UPSTREAM_ENV or CHECKED_ONLY; the lowercase ones are plain shell variables upstream and are not read
# (generic names such as `shift` or `lr` in someone's environment must not change a run): the preset
# configs/upstream.yaml carries their script values, and --set changes them.
_VARIABLES: dict[str, tuple[str, str]] = {
    "HUNYUAN_VIDEO_PATH": ("model.path", "the diffusers-layout HunyuanVideo folder"),
    "TRL_MODEL_PATH": ("rewards.orm.path", "the SoliReward pixel ORM checkpoint"),
    "TRL_PROMPT_VARIANT": ("rewards.orm.prompt_variant", "ORM prompt: deformity_physics or ta"),
    "TRL_CORE_ENABLED": ("rewards.orm.enabled", "score videos with the pixel ORM; off: its reward is absent"),
    "TRL_DTYPE": ("rewards.orm.dtype", "ORM weights dtype (bf16 or fp32 here; upstream also fp16)"),
    "SCORE_COEF": ("rewards.orm.coef, advantage.outcome_weight",
                   "scales the ORM in the combined score **and** weights the score's loss term, as upstream"),
    "LATENT_REWARD_IN_TRL_REWARD_ENABLED": ("rewards.latent_outcome, rgg.enabled",
                                            "load the latent PRM: its outcome score is a term of upstream's "
                                            "objective (weight 1); false also turns RGG off, as upstream"),
    "LATENT_REWARD_IN_TRL_REWARD_COEF": ("rewards.latent_outcome_coef_in_score",
                                         "mixes the latent outcome into the score only; the latent term stays"),
    "LATENT_REWARD_IN_TRL_REWARD_CHECKPOINT_DIR": ("rewards.prm.path", "the latent PRM checkpoint"),
    "LATENT_REWARD_IN_TRL_REWARD_DTYPE": ("rewards.prm.dtype", "PRM weights dtype"),
    "LATENT_REWARD_USE_SIGMOID": ("rewards.prm.use_sigmoid", "squash PRM scores to [0, 1]"),
    "PROCESS_LATENT_REWARD_ENABLED": ("rgg.enabled", "RGG main switch: RGG = this ∧ SAMPLING ∧ LATENT..._ENABLED"),
    "PROCESS_LATENT_REWARD_SAMPLING_ENABLED": ("rgg.enabled", "RGG during rollouts (see the line above)"),
    "PROCESS_LATENT_REWARD_TRAINING_ENABLED": ("optim.logprob_mean_training",
                                               "training-time PRM gradient: the guided training mean needs it"),
    "PROCESS_LATENT_REWARD_GUIDANCE_SCALE": ("rgg.scale, rgg.scale_mode", "c; a negative value: KL mode η²/(2β)"),
    "PROCESS_LATENT_REWARD_KL_BETA": ("rgg.kl_beta", "β of KL mode"),
    "PROCESS_LATENT_REWARD_NORMALIZE_GRADIENT": ("rgg.normalize", "divide g by its norm (per sample here)"),
    "PROCESS_LATENT_REWARD_START_STEP": ("rgg.start", "first guided step"),
    "PROCESS_LATENT_REWARD_END_STEP": ("rgg.end", "guided steps end before this; negative: to the last step"),
    "PROCESS_LATENT_REWARD_INTERVAL": ("rgg.interval", "guide every k-th step"),
    "USE_DELTA_T_FOR_GRADIENT_SCALING": ("rgg.delta_t_scaling, spsa.delta_t_scaling", "multiply the shift by Δt"),
    "USE_REWARD_GUIDED_MEAN_FOR_LOGPROB": ("optim.logprob_mean", "old log-prob under the guided mean"),
    "USE_REWARD_GUIDED_MEAN_FOR_LOGPROB_TRAINING": ("optim.logprob_mean_training",
                                                    "new log-prob under the guided mean (needs ..._TRAINING_ENABLED)"),
    "PROCESS_REWARD_ADVANTAGE_MODE": ("advantage.mode, advantage.combine",
                                      "none, only or both (0, 1, 2); selects upstream's separately clipped terms"),
    "PROCESS_REWARD_ADVANTAGE_COEF": ("advantage.process_weight", "weight of the process term"),
    "OUTCOME_REWARD_ADVANTAGE_COEF": ("advantage.outcome_weight, pixel_outcome_weight, latent_outcome_weight",
                                      "multiplies the outcome terms in mode both only (ignored in none, as upstream)"),
    "USE_KL_LOSS": ("optim.kl_coef, optim.kl_form", "KL to the frozen reference, in upstream's form"),
    "KL_COEF": ("optim.kl_coef", "KL weight when USE_KL_LOSS (script: 3.125)"),
    "KL_TYPE": ("—", CHECKED_ONLY["KL_TYPE"]),
    "KL_WEIGHT_VERSION": ("—", CHECKED_ONLY["KL_WEIGHT_VERSION"]),
    "SPSA_REWARD_ENABLED": ("spsa.enabled", "zeroth-order ORM-gradient guidance"),
    "SPSA_REWARD_SIGMA": ("spsa.sigma", "perturbation size δ"),
    "SPSA_REWARD_GUIDANCE_SCALE": ("spsa.scale, spsa.scale_mode", "c of SPSA; negative: KL mode"),
    "SPSA_REWARD_NORMALIZE_GRADIENT": ("spsa.normalize", "divide ĝ by its norm"),
    "SPSA_REWARD_NUM_SAMPLES": ("spsa.num_samples", "perturbation pairs per step"),
    "SPSA_REWARD_START_STEP": ("spsa.start", "first SPSA step"),
    "SPSA_REWARD_END_STEP": ("spsa.end", "SPSA steps end before this; negative: to the last step"),
    "SPSA_REWARD_INTERVAL": ("spsa.interval", "every k-th step"),
    "SPSA_REWARD_KL_BETA": ("spsa.kl_beta", "β of SPSA's KL mode"),
    "VIDEO_ALIGN_IN_TRL_REWARD_ENABLED": ("—", CHECKED_ONLY["VIDEO_ALIGN_IN_TRL_REWARD_ENABLED"]),
    "VIDEO_ALIGN_IN_TRL_REWARD_PRETRAINED_PATH / _USE_NORM / _VQ_COEF / _MQ_COEF / _TA_COEF":
        ("—", "not read (VideoAlign is not available)"),
    "TRL_MODEL_TYPE / TRL_PATH / TRL_TOKENIZER_PATH / LATENT_PRM_PATH / WORKDIR":
        ("—", "not read: code locations upstream; here the ORM backend is `rewards.orm.backend`"),
    "data_json_path": ("data.prompts", "not read; videos2caption.json of `euphonium-ray preprocess`"),
    "dit_model_name_or_path": ("model.checkpoint", "not read; a transformer checkpoint to start from"),
    "output_base_dir": ("output.dir", "not read"),
    "use_same_noise": ("sampler.same_initial_noise", "not read; one initial noise per group (script: true)"),
    "num_generations": ("sampler.group_size", "not read; G (script: 8)"),
    "sampling_steps": ("sampler.num_steps", "not read; N (script: 16)"),
    "shift": ("sampler.shift", "not read; schedule shift (script: 5)"),
    "fps": ("—", "not read; upstream writes mp4s at this rate before scoring, frames stay in memory here"),
    "num_frames / width / height": ("data.num_frames, data.width, data.height", "not read (script: 32, 480, 480)"),
    "timestep_fraction": ("optim.timestep_fraction", "not read; share of transitions trained (script: 0.6)"),
    "timestep_selection_mode / timestep_range_start / _end / _interval":
        ("optim.timestep_selection, optim.range_start, range_end, range_interval", "not read"),
    "lr": ("optim.lr", "not read (script: 1e-6)"),
    "conda_*, USE_RDZV, hostfile, network_adapter, MASTER_PORT, nproc_per_node, NCCL_*":
        ("cluster.*", "not read: Ray places the roles (docs/deploy.md)"),
}


def variable_table_markdown() -> str:
    """Every launch-script variable -> our key -> meaning (docs/config.md)."""
    missing = set(UPSTREAM_ENV) - set(_VARIABLES)
    if missing:
        raise AssertionError(f"undocumented upstream variables: {sorted(missing)}")
    rows = ["| upstream variable | our key | meaning |", "|---|---|---|"]
    for name, (key, meaning) in _VARIABLES.items():
        shown_key = key if key == "—" else ", ".join(f"`{k.strip()}`" for k in key.split(","))
        rows.append(f"| `{name}` | {shown_key} | {meaning} |")
    return "\n".join(rows)


# setting -> (our key, upstream dataclass default, upstream launch-script value); "ours" is read from RunConfig().
# Dataclass defaults: euphonium/grpo/grpo_config/*_args.py; script: scripts/train_grpo_hunyuan.sh (both at d9f2c39).
_DEFAULTS: list[tuple[str, str, str, str]] = [
    ("`--sampling_steps`", "sampler.num_steps", "None (required)", "16"),
    ("`--shift`", "sampler.shift", "1.0", "5"),
    ("`--eta`", "sampler.eta", "None (required)", "0.25"),
    ("`--num_generations`", "sampler.group_size", "16", "8"),
    ("`--use_same_noise`", "sampler.same_initial_noise", "false", "true"),
    ("timestep arithmetic (code)", "sampler.timestep_arithmetic", "fp32", "fp32"),
    ("`--h`, `--w`", "data.height", "None", "480"),
    ("`--t`", "data.num_frames", "None", "32"),
    ("`--sampler_seed`", "data.shuffle_seed", "None", "1237"),
    ("`--seed`", "seed", "None", "42"),
    ("`--max_train_steps`", "steps", "None", "501"),
    ("`--checkpointing_steps`", "output.save_every", "500", "25"),
    ("`--learning_rate`", "optim.lr", "1e-4", "1e-6"),
    ("`--weight_decay`", "optim.weight_decay", "0.01", "1e-4"),
    ("`--max_grad_norm`", "optim.grad_clip", "2.0", "1.0"),
    ("`--gradient_accumulation_steps`", "optim.grad_accum", "1", "4"),
    ("`--timestep_fraction`", "optim.timestep_fraction", "1.0", "0.6"),
    ("clip range (hard-coded)", "optim.clip_range", "1e-4", "1e-4"),
    ("TF32 matmuls (`train_grpo_hunyuan.py:58`)", "model.tf32", "on, always", "on, always"),
    ("advantage clamp (hard-coded)", "advantage.clamp", "5.0", "5.0"),
    ("`TRL_CORE_ENABLED`", "rewards.orm.enabled", "true", "true"),
    ("`SCORE_COEF`", "rewards.orm.coef", "1.0", "1.0"),
    ("`LATENT_REWARD_IN_TRL_REWARD_ENABLED`", "rewards.latent_outcome", "false", "true"),
    ("`LATENT_REWARD_IN_TRL_REWARD_COEF`", "rewards.latent_outcome_coef_in_score", "1.0", "0.0"),
    ("`PROCESS_LATENT_REWARD_{,SAMPLING_}ENABLED`", "rgg.enabled", "false, false", "true, true"),
    ("`PROCESS_LATENT_REWARD_GUIDANCE_SCALE`", "rgg.scale", "0.1", "0.01"),
    ("`PROCESS_LATENT_REWARD_NORMALIZE_GRADIENT`", "rgg.normalize", "true", "false"),
    ("`PROCESS_LATENT_REWARD_KL_BETA`", "rgg.kl_beta", "0.1", "3.125"),
    ("`USE_DELTA_T_FOR_GRADIENT_SCALING`", "rgg.delta_t_scaling", "false", "true"),
    ("`PROCESS_LATENT_REWARD_START_STEP`", "rgg.start", "0", "12"),
    ("`PROCESS_LATENT_REWARD_END_STEP`", "rgg.end", "-1", "-1"),
    ("guided members of a group (code)", "rgg.guided_fraction", "all", "all"),
    ("`USE_REWARD_GUIDED_MEAN_FOR_LOGPROB`", "optim.logprob_mean", "true (guided)", "false (unguided)"),
    ("`USE_REWARD_GUIDED_MEAN_FOR_LOGPROB_TRAINING`", "optim.logprob_mean_training", "true (guided)",
     "false (unguided)"),
    ("`PROCESS_REWARD_ADVANTAGE_MODE`", "advantage.mode", "none", "both"),
    ("how terms combine (code)", "advantage.combine", "separately clipped", "separately clipped"),
    ("weight of `score`", "advantage.outcome_weight", "1 (SCORE_COEF)", "1 (OUTCOME_COEF·SCORE_COEF)"),
    ("weight of `trl` (≡ score at LATENT_COEF 0)", "advantage.pixel_outcome_weight", "1", "1"),
    ("weight of `latent_reward`", "advantage.latent_outcome_weight", "— (latent model off)", "1"),
    ("`PROCESS_REWARD_ADVANTAGE_COEF`", "advantage.process_weight", "1.0 (unused in mode none)", "1.0"),
    ("process reward crediting transition k (code)", "advantage.process_credit", "input: r(x_k)", "input: r(x_k)"),
    ("`USE_KL_LOSS` / `KL_COEF`", "optim.kl_coef", "false / 0.01", "false / 3.125"),
    ("KL form (code)", "optim.kl_form", "upstream", "upstream"),
    ("`SPSA_REWARD_ENABLED`", "spsa.enabled", "false", "false"),
    ("`SPSA_REWARD_GUIDANCE_SCALE`", "spsa.scale", "0.1", "0.01"),
    ("`SPSA_REWARD_NORMALIZE_GRADIENT`", "spsa.normalize", "true", "false"),
    ("`SPSA_REWARD_START_STEP`", "spsa.start", "0", "12"),
    ("`SPSA_REWARD_KL_BETA`", "spsa.kl_beta", "0.1", "0.3125"),
]


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def _dotted(cfg: RunConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def defaults_table_markdown(preset: RunConfig | None = None) -> str:
    """Upstream dataclass defaults, upstream launch-script values, ours (and the preset) side by side."""
    ours = RunConfig()
    head = "| setting | our key | upstream dataclass | upstream script | ours |"
    sep = "|---|---|---|---|---|"
    if preset is not None:
        head, sep = head + " `configs/upstream.yaml` |", sep + "---|"
    rows = [head, sep]
    for setting, key, dataclass_default, script_value in _DEFAULTS:
        row = f"| {setting} | `{key}` | {dataclass_default} | {script_value} | {_show(_dotted(ours, key))} |"
        if preset is not None:
            row += f" {_show(_dotted(preset, key))} |"
        rows.append(row)
    return "\n".join(rows)
