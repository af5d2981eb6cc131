"""The component registries (``euphonium_ray/registry.py``): one per kind, used everywhere, extended by plugins.

What a user relies on: ``models/`` never drags the toy world in; a reward written outside the package, listed
under ``plugins:``, is found by name by the config, by ``registry.ORMS`` and by a real ``euphonium-ray train`` on
Ray (whose actors import the plugin themselves); a misspelt name fails with one line that lists the choices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from euphonium_ray.config import ConfigError, load_config
from euphonium_ray.registry import CODECS, ORMS, POLICIES, PRMS, Registry, RegistryError

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "user_brightness_plugin"
PLUGIN_SOURCE = '''
"""A user's reward, outside the package: mean brightness of the video, times a gain read from the run config."""
import json
import os

import torch

from euphonium_ray.registry import ORMS

CALLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "brightness_calls.jsonl")


class Brightness:
    def __init__(self, gain: float) -> None:
        self.gain = gain

    def score(self, videos: torch.Tensor, captions: list[str]) -> torch.Tensor:
        scores = self.gain * (videos.float().mean(dim=(1, 2, 3, 4)) + 1) / 2
        with open(CALLS, "a") as f:  # who scored what, so the test can see the Ray actor used this reward
            f.write(json.dumps({"pid": os.getpid(), "scores": scores.tolist(), "captions": list(captions)}) + "\\n")
        return scores


@ORMS.register("user-brightness")
def build(cfg, device):
    return Brightness(gain=cfg.rewards.orm.coef)
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> Path:
    """The plugin module written in ``tmp_path`` and importable from it; the registry is restored afterwards."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / f"{PLUGIN}.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(ORMS, "_entries", dict(ORMS._entries))
    monkeypatch.delitem(sys.modules, PLUGIN, raising=False)
    yield folder
    sys.modules.pop(PLUGIN, None)


# -------------------------------------------------------------------------------------------- layering
def test_models_package_imports_no_toy_module_even_when_its_registered_components_are_resolved():
    """Every module of ``euphonium_ray/models`` imported in a fresh interpreter, then the non-toy registry entries
    resolved: no ``euphonium_ray.toy`` module may be loaded by then."""
    models = sorted(p.stem for p in (ROOT / "euphonium_ray" / "models").glob("*.py") if p.stem != "__init__")
    assert {"base", "codecs", "hunyuan", "orm_solireward", "orm_vllm", "prm"} <= set(models)
    script = textwrap.dedent(f"""
        import importlib, json, sys
        for name in {models!r}:
            importlib.import_module("euphonium_ray.models." + name)
        after_import = sorted(m for m in sys.modules if m.startswith("euphonium_ray.toy"))
        from euphonium_ray.registry import CODECS, ORMS, POLICIES, PRMS
        POLICIES.get("hunyuanvideo"); CODECS.get("AutoencoderKLHunyuanVideo"); PRMS.get("latent")
        ORMS.get("solireward"); ORMS.get("vllm")
        after_resolve = sorted(m for m in sys.modules if m.startswith("euphonium_ray.toy"))
        print(json.dumps({{"import": after_import, "resolve": after_resolve,
                          "loaded": sorted(m for m in sys.modules if m.startswith("euphonium_ray.models."))}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["loaded"] == [f"euphonium_ray.models.{m}" for m in models]
    assert seen["import"] == [] and seen["resolve"] == []


def test_the_toy_world_parts_resolve_by_name_to_the_toy_package():
    from euphonium_ray.toy.codec import PixelUnshuffleCodec
    from euphonium_ray.toy.oracle import OracleProcessReward
    from euphonium_ray.toy.rewards import caption_reward

    assert CODECS.component_class("PixelUnshuffleCodec") is PixelUnshuffleCodec
    assert PRMS.component_class("oracle") is OracleProcessReward
    assert ORMS.get("toy") is caption_reward


def test_component_class_is_the_registered_class_or_the_owner_of_its_classmethod():
    from euphonium_ray.models.hunyuan import HunyuanVideoPolicy
    from euphonium_ray.models.prm import LatentPRM

    assert POLICIES.component_class("hunyuanvideo") is HunyuanVideoPolicy
    assert PRMS.component_class("latent") is LatentPRM
    with pytest.raises(RegistryError, match=r"outcome reward 'toy' is registered as <function caption_reward"):
        ORMS.component_class("toy")


# ----------------------------------------------------------------------------------------- bad names
@pytest.mark.parametrize("key, value, kind, names", [
    ("rewards.orm.backend", "solireward2", "outcome reward", ORMS.names()),
    ("model.family", "hunyan", "policy family", POLICIES.names()),
    ("rewards.prm.kind", "latnet", "process reward model", PRMS.names()),
])
def test_an_unknown_component_name_is_one_line_listing_the_registered_ones(key, value, kind, names):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}={value}"], use_env=False)
    message = str(err.value)
    assert "\n" not in message
    assert f"unknown {kind} {value!r} for {key}; registered: {', '.join(names)}" in message


def test_registry_lookup_of_an_unknown_name_is_one_line_listing_the_registered_ones():
    with pytest.raises(RegistryError) as err:
        ORMS.build("brightness", None, "cpu")
    assert str(err.value) == f"unknown outcome reward 'brightness'; registered: {', '.join(ORMS.names())}"
    with pytest.raises(RegistryError, match=r"^unknown latent codec 'VQGAN'; registered: AutoencoderKLHunyuanVideo, "
                                            r"PixelUnshuffleCodec$"):
        CODECS.get("VQGAN")


def test_a_plugin_that_cannot_be_imported_or_that_fails_while_importing_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"^plugin module 'no_such_plugin' \(config key 'plugins'\) cannot be "
                                          r"imported: No module named 'no_such_plugin'$"):
        load_config(None, ["plugins=[no_such_plugin]"], use_env=False)
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('the reward server is down')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as err:
        load_config(None, ["plugins=[broken_plugin]"], use_env=False)
    assert str(err.value) == ("plugin module 'broken_plugin' (config key 'plugins') failed while importing: "
                              "RuntimeError: the reward server is down")
    sys.modules.pop("broken_plugin", None)


def test_registering_a_taken_name_needs_replace():
    reg = Registry("thing", {"a": "json:dumps"})
    with pytest.raises(RegistryError, match=r"thing 'a' is already registered \(pass replace=True to override\)"):
        reg.register("a", print)
    reg.register("a", print, replace=True)
    assert reg.get("a") is print


# --------------------------------------------------------------------------------------- a user plugin
def test_a_plugin_reward_is_known_to_the_config_and_built_by_name(plugin):
    with pytest.raises(ConfigError, match="unknown outcome reward 'user-brightness'"):
        load_config(ROOT / "configs" / "toy.yaml", ["rewards.orm.backend=user-brightness"], use_env=False)
    cfg = load_config(ROOT / "configs" / "toy.yaml", [f"plugins=[{PLUGIN}]", "rewards.orm.backend=user-brightness",
                                                      "rewards.orm.coef=3.0"], use_env=False)
    assert "user-brightness" in ORMS.names()
    reward = ORMS.build(cfg.rewards.orm.backend, cfg, "cpu")
    videos = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    expected = torch.tensor([3.0 * (videos[i].mean().item() + 1) / 2 for i in range(2)])
    torch.testing.assert_close(reward.score(videos, ["a", "b"]), expected)


@pytest.mark.ray
@pytest.mark.slow
def test_euphonium_ray_train_on_the_toy_world_scores_rollouts_with_the_plugin_reward(plugin, world, tmp_path, capsys,
                                                                                     monkeypatch):
    """``euphonium-ray train`` (``driver.main``, its own embedded Ray) with ``plugins: [user_brightness_plugin]`` and
    ``rewards.orm.backend: user-brightness``: the ORM actor imports the plugin and the step's logged rewards are the
    ones the plugin computed in that actor's process. The plugin is importable here only through ``sys.path``, as
    a module in the user's working directory is: the driver hands its folder to Ray's workers."""
    from euphonium_ray.driver import main

    from conftest import run_config

    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # the driver extends it; undone afterwards

    cfg = run_config(world, tmp_path / "run", "steps=1", f"plugins=[{PLUGIN}]", "rewards.orm.backend=user-brightness",
                     "rewards.orm.coef=1.0")
    config_file = tmp_path / "run.yaml"
    cfg.save(config_file)
    assert main(["--config", str(config_file), "--no-env", "--no-progress"]) == 0, capsys.readouterr().err
    calls = [json.loads(line) for line in (plugin / "brightness_calls.jsonl").read_text().splitlines()]
    logged = json.loads((tmp_path / "run" / "logs" / "rewards.jsonl").read_text().splitlines()[0])
    rollout = [c for c in calls if c["captions"] == logged["captions"]]
    assert len(rollout) == 1 and rollout[0]["pid"] != os.getpid()  # scored inside the ORM actor
    assert logged["orm"] == pytest.approx(rollout[0]["scores"], abs=1e-6)
    assert all(0.0 <= s <= 1.0 for s in logged["orm"]) and len(set(logged["orm"])) > 1


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from conftest import toy_world

    return toy_world(tmp_path_factory.getbasetemp() / "toy-world")
