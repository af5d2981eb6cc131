"""The run config: YAML round trip, precedence file < env < --set, upstream env names, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from euphonium_ray.config import ConfigError, RunConfig, env_table_markdown, load_config
from euphonium_ray.upstream_env import UPSTREAM_ENV, env_overrides

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_upstream_script_defaults() -> None:
    cfg = RunConfig()
    assert (cfg.sampler.num_steps, cfg.sampler.shift, cfg.sampler.eta, cfg.sampler.group_size) == (16, 5.0, 0.25, 8)
    assert (cfg.rgg.scale, cfg.rgg.start, cfg.rgg.end, cfg.rgg.interval) == (0.01, 12, None, 1)
    assert cfg.rgg.delta_t_scaling and not cfg.rgg.normalize
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.clip_range, cfg.optim.timestep_fraction) == (
        1e-6,
        1e-4,
        1e-4,
        0.6,
    )
    assert cfg.advantage.clamp == 5.0 and cfg.advantage.mode == "both"


def test_kl_mode_scale_is_eta_squared_over_two_beta() -> None:
    cfg = load_config(None, ["rgg.scale_mode=kl", "rgg.kl_beta=3.125"], use_env=False)
    assert cfg.guidance_scale == pytest.approx(0.25**2 / (2 * 3.125))
    assert cfg.guidance_scale == pytest.approx(0.01)


def test_yaml_round_trip_reproduces_the_model(tmp_path: Path) -> None:
    cfg = load_config(None, ["rgg.scale=0.05", "sampler.noise_type=flow", "cluster.mode=async", "steps=7"], use_env=False)
    path = tmp_path / "run.yaml"
    cfg.save(path)
    again = load_config(path, use_env=False)
    assert again == cfg
    assert yaml.safe_load(again.to_yaml()) == yaml.safe_load(cfg.to_yaml())


def test_precedence_file_then_env_then_set(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("rgg:\n  start: 10\n  interval: 2\nsampler:\n  eta: 0.3\n")
    env = {"PROCESS_LATENT_REWARD_START_STEP": "11", "PROCESS_LATENT_REWARD_INTERVAL": "3"}
    cfg = load_config(path, ["rgg.interval=4"], environ=env)
    assert cfg.sampler.eta == 0.3  # file only
    assert cfg.rgg.start == 11  # env beats file
    assert cfg.rgg.interval == 4  # --set beats env


def test_upstream_env_variables_map_to_config_keys() -> None:
    env = {
        "TRL_CORE_ENABLED": "false",
        "LATENT_REWARD_IN_TRL_REWARD_ENABLED": "true",
        "LATENT_REWARD_IN_TRL_REWARD_COEF": "0.5",
        "PROCESS_LATENT_REWARD_ENABLED": "1",
        "USE_REWARD_GUIDED_MEAN_FOR_LOGPROB": "true",
        "USE_REWARD_GUIDED_MEAN_FOR_LOGPROB_TRAINING": "false",
        "PROCESS_LATENT_REWARD_GUIDANCE_SCALE": "0.02",
        "USE_DELTA_T_FOR_GRADIENT_SCALING": "no",
        "PROCESS_REWARD_ADVANTAGE_MODE": "1",
        "SPSA_REWARD_ENABLED": "on",
        "PROCESS_LATENT_REWARD_END_STEP": "-1",
        "USE_KL_LOSS": "true",
    }
    cfg = load_config(None, environ=env)
    assert cfg.rewards.orm.enabled is False
    assert cfg.rewards.latent_outcome is True
    assert cfg.rewards.latent_outcome_coef_in_score == 0.5
    assert cfg.rgg.enabled is True
    assert cfg.optim.logprob_mean == "guided" and cfg.optim.logprob_mean_training == "unguided"
    assert cfg.rgg.scale == 0.02 and cfg.rgg.scale_mode == "fixed"
    assert cfg.rgg.delta_t_scaling is False
    assert cfg.advantage.mode == "only"  # upstream numeric alias 1
    assert cfg.spsa.enabled is True
    assert cfg.rgg.end is None
    assert cfg.optim.kl_coef == 3.125  # upstream KL_COEF default when USE_KL_LOSS is on


def test_negative_upstream_guidance_scale_selects_kl_mode() -> None:
    cfg = load_config(None, environ={"PROCESS_LATENT_REWARD_GUIDANCE_SCALE": "-1", "PROCESS_LATENT_REWARD_KL_BETA": "3.125"})
    assert cfg.rgg.scale_mode == "kl"
    assert cfg.guidance_scale == pytest.approx(0.01)


def test_every_documented_env_variable_is_read() -> None:
    table = env_table_markdown()
    for name in UPSTREAM_ENV:
        assert f"`{name}`" in table
    doc = (REPO / "docs" / "config.md").read_text()
    assert table in doc, "docs/config.md is stale: regenerate the env table with env_table_markdown()"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("rgg.scale=-0.5", "rgg.scale"),
        ("rgg.start=16", "rgg.start=16 is past the last sampling step"),
        ("advantage.mode=bogus", "advantage.mode"),
        ("rgg.normalize=maybe", "rgg.normalize"),
        ("sampler.noise_type=brownian", "sampler.noise_type"),
        ("optim.timestep_fraction=1.5", "optim.timestep_fraction"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_field(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override], use_env=False)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_non_boolean_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="PROCESS_LATENT_REWARD_NORMALIZE_GRADIENT: 'maybe' is not a boolean"):
        env_overrides({"PROCESS_LATENT_REWARD_NORMALIZE_GRADIENT": "maybe"})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TRL_DTYPE": "fp8"},
         "rewards.orm.dtype: Input should be 'fp32' or 'bf16' (got 'fp8') (from TRL_DTYPE='fp8')"),
        ({"TRL_PROMPT_VARIANT": "bogus"},
         "rewards.orm.prompt_variant: Input should be 'deformity_physics' or 'ta' (got 'bogus') "
         "(from TRL_PROMPT_VARIANT='bogus')"),
        ({"PROCESS_LATENT_REWARD_KL_BETA": "0"},
         "rgg.kl_beta: Input should be greater than 0 (got 0.0) (from PROCESS_LATENT_REWARD_KL_BETA='0')"),
        ({"SPSA_REWARD_NUM_SAMPLES": "0"},
         "spsa.num_samples: Input should be greater than or equal to 1 (got 0) (from SPSA_REWARD_NUM_SAMPLES='0')"),
        # a rule across fields (no single location): the variable is found by the key the message names
        ({"PROCESS_LATENT_REWARD_START_STEP": "99", "PROCESS_LATENT_REWARD_GUIDANCE_SCALE": "-1"},
         "rgg.start=99 is past the last sampling step (sampler.num_steps=16) "
         "(from PROCESS_LATENT_REWARD_START_STEP='99')"),
    ],
    ids=["orm-dtype", "prompt-variant", "kl-beta", "spsa-samples", "start-step"],
)
def test_an_invalid_value_from_an_upstream_environment_variable_names_the_variable(environ, message) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ=environ)
    assert str(info.value) == f"invalid config: {message}"
    # the same bad value typed with --set is the user's own: no variable is blamed
    key = message.split(":")[0].split("=")[0]
    value = next(iter(environ.values()))
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}={value}"], environ=environ)
    assert "(from " not in str(info.value)


def test_an_empty_config_file_says_it_is_empty(tmp_path: Path) -> None:
    for text in ("", "\n\n", "# nothing but a comment\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(path, use_env=False)
        assert str(info.value) == f"config file {path} is empty (no keys at all); start from configs/toy.yaml"


def test_unknown_key_names_the_nearest_valid_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown config key 'rgg.scal'; did you mean 'rgg.scale'"):
        load_config(None, ["rgg.scal=1"], use_env=False)
    path = tmp_path / "bad.yaml"
    path.write_text("sampler:\n  num_step: 8\n")
    with pytest.raises(ConfigError, match="did you mean 'sampler.num_steps'"):
        load_config(path, use_env=False)


def test_missing_or_malformed_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rgg: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)


def test_config_show_prints_the_resolved_config(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("steps: 3\n")
    out = subprocess.run(
        [sys.executable, "-m", "euphonium_ray.cli", "config", "show", "--config", str(path), "--set", "rgg.scale=0.03"],
        capture_output=True,
        text=True,
        check=True,
    )
    shown = yaml.safe_load(out.stdout)
    assert shown["steps"] == 3 and shown["rgg"]["scale"] == 0.03
    bad = subprocess.run(
        [sys.executable, "-m", "euphonium_ray.cli", "config", "show", "--set", "advantage.mode=bogus"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "advantage.mode" in bad.stderr
