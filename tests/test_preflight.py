"""Files a run would load are checked before Ray starts (``euphonium_ray/preflight.py``): each bad one is one line
naming the file and what is wrong, exit 2, no Ray (so no actor), and the output folder exactly as it was.

The models are real and tiny (a diffusers HunyuanVideo transformer from ``models/tiny.py``, a latent PRM built from
its first block, checkpoints written by ``checkpoint.save_checkpoint``); the damage is done to their files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file, save_file

from euphonium_ray.checkpoint import save_checkpoint
from euphonium_ray.config import load_config
from euphonium_ray.driver import main
from euphonium_ray.models.hunyuan import HunyuanVideoPolicy
from euphonium_ray.models.prm import LatentPRM
from euphonium_ray.models.tiny import build_tiny_transformer
from euphonium_ray.preflight import run_file_problems
from euphonium_ray.safetensors_header import HeaderError, read_header

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "diffusion_pytorch_model.safetensors"
LORA_RANK = 4


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny model folder, a latent PRM from its first block, and a full and a LoRA step folder of it."""
    base = tmp_path_factory.mktemp("preflight")
    model = base / "model"
    build_tiny_transformer(model / "transformer", in_channels=4, text_dim=16, pooled_dim=8)
    policy = HunyuanVideoPolicy.from_pretrained(model, with_codec=False)
    LatentPRM.from_policy(policy.transformer, 1, 0).save_pretrained(base / "prm")
    full = save_checkpoint(base / "full-run", 2, policy, torch.optim.AdamW(policy.trainable_parameters()), {})
    lora = HunyuanVideoPolicy.from_pretrained(model, with_codec=False, trainable="lora", lora_rank=LORA_RANK)
    lora_step = save_checkpoint(base / "lora-run", 2, lora, torch.optim.AdamW(lora.trainable_parameters()), {})
    return {"base": base, "model": model, "prm": base / "prm", "full": full, "lora": lora_step}


def _config(files: dict[str, Path], out: Path, *sets: str):
    base = [f"model.path={files['model']}", "model.family=hunyuanvideo", f"rewards.prm.path={files['prm']}",
            "rewards.prm.kind=latent", "rgg.enabled=true", f"output.dir={out}", "data.prompts=prompts.json",
            "data.eval_prompts=null", "model.trainable=full", f"model.lora_rank={LORA_RANK}"]
    return load_config(ROOT / "configs" / "toy.yaml", base + list(sets), use_env=False)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(file: Path) -> int:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    return len(data)


def _rewrite(file: Path, change) -> None:
    state = load_file(str(file))
    change(state)
    save_file(state, str(file))


def _tree(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def _train(files: dict[str, Path], tmp_path: Path, capsys, *sets: str,
           resume: str | None = None) -> tuple[int, list[str]]:
    """``euphonium-ray train`` on a config (output folder holding a previous run's file); returns (exit code, stderr
    lines) after checking that Ray never started and the output folder is as it was."""
    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "train.log").write_text("a previous run's log\n")
    before = _tree(out)
    config = tmp_path / "run.yaml"
    _config(files, out, *sets).save(config)
    code = main(["--config", str(config), "--no-env", "--no-progress"] + (["--resume", resume] if resume else []))
    assert not ray.is_initialized()  # no Ray, so no actor
    assert _tree(out) == before
    return code, capsys.readouterr().err.strip().splitlines()


# ------------------------------------------------------------------------------------------ good files pass
def test_a_whole_model_prm_and_full_or_lora_checkpoint_pass_the_preflight(files, tmp_path):
    out = tmp_path / "run"
    assert run_file_problems(_config(files, out)) == []
    assert run_file_problems(_config(files, out, f"model.checkpoint={files['full'] / 'transformer'}")) == []
    assert run_file_problems(_config(files, out), files["full"]) == []
    assert run_file_problems(_config(files, out, "model.trainable=lora"), files["lora"]) == []


def test_the_header_reader_agrees_with_safetensors_on_names_dtypes_and_shapes(files):
    file = files["model"] / "transformer" / WEIGHTS
    state = load_file(str(file))
    header = read_header(file)
    assert header.keys == set(state)
    assert all(header.shape(k) == tuple(v.shape) for k, v in state.items())
    assert {dtype for dtype, _ in header.tensors.values()} == {"F32"}
    assert {v.dtype for v in state.values()} == {torch.float32}


def test_a_file_longer_than_its_header_says_is_refused_too(files, tmp_path):
    file = tmp_path / "padded.safetensors"
    data = (files["prm"] / "model.safetensors").read_bytes()
    file.write_bytes(data + b"\0" * 16)
    with pytest.raises(HeaderError, match=f"is {len(data) + 16} bytes but its header describes {len(data)}"):
        read_header(file)


# -------------------------------------------------------------------------------------------- truncation
def test_a_truncated_policy_weights_file_is_one_line_no_ray_and_the_output_folder_untouched(files, tmp_path, capsys):
    model = _copy(files["model"], tmp_path / "model")
    size = _truncate(model / "transformer" / WEIGHTS)
    code, err = _train(files, tmp_path, capsys, f"model.path={model}")
    assert code == 2
    assert err == [f"error: {model / 'transformer' / WEIGHTS} is {size // 2} bytes but its header describes {size} "
                   "(truncated or overwritten) (model.path)"]


def test_a_truncated_prm_weights_file_is_one_line(files, tmp_path, capsys):
    prm = _copy(files["prm"], tmp_path / "prm")
    size = _truncate(prm / "model.safetensors")
    code, err = _train(files, tmp_path, capsys, f"rewards.prm.path={prm}")
    assert code == 2
    assert err == [f"error: {prm / 'model.safetensors'} is {size // 2} bytes but its header describes {size} "
                   "(truncated or overwritten) (rewards.prm.path)"]


def test_a_truncated_orm_weights_shard_is_one_line(files, tmp_path, capsys):
    """An ORM folder in transformers' sharded layout (index + shards), one shard cut short."""
    orm = tmp_path / "orm"
    orm.mkdir()
    save_file({"a.weight": torch.ones(4, 4)}, str(orm / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": torch.ones(64, 4)}, str(orm / "model-00002-of-00002.safetensors"))
    (orm / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}))
    shard = orm / "model-00002-of-00002.safetensors"
    size = _truncate(shard)
    code, err = _train(files, tmp_path, capsys, "rewards.orm.backend=solireward", f"rewards.orm.path={orm}")
    assert code == 2
    assert err == [f"error: {shard} is {size // 2} bytes but its header describes {size} (truncated or overwritten) "
                   "(rewards.orm.path)"]


# ---------------------------------------------------------------------------------------------- key sets
@pytest.mark.parametrize("damage, said", [
    (lambda s: s.update({"extra_head.weight": torch.zeros(3)}), "1 unexpected key(s): extra_head.weight"),
    (lambda s: s.pop("proj_out.bias"), "missing 1 key(s): proj_out.bias"),
    (lambda s: s.update({"proj_out.bias": torch.zeros(5)}), "1 shape mismatch(es): proj_out.bias (5,) vs {bias}"),
], ids=["extra-key", "missing-key", "wrong-shape"])
def test_a_model_checkpoint_with_an_extra_or_missing_key_is_one_line(files, tmp_path, capsys, damage, said):
    ckpt = _copy(files["full"] / "transformer", tmp_path / "ckpt")
    said = said.format(bias=tuple(load_file(str(ckpt / WEIGHTS))["proj_out.bias"].shape))
    _rewrite(ckpt / WEIGHTS, damage)
    code, err = _train(files, tmp_path, capsys, f"model.checkpoint={ckpt}")
    assert code == 2
    assert err == [f"error: {ckpt / WEIGHTS} does not match the transformer of model.path (model.checkpoint): {said}"]


def test_a_base_model_missing_a_tensor_is_one_line_where_diffusers_would_initialise_it_at_random(files, tmp_path,
                                                                                                    capsys):
    model = _copy(files["model"], tmp_path / "model")
    _rewrite(model / "transformer" / WEIGHTS, lambda s: s.pop("proj_out.bias"))
    code, err = _train(files, tmp_path, capsys, f"model.path={model}")
    assert code == 2
    assert err == [f"error: {model / 'transformer' / WEIGHTS} does not match its config.json (a missing tensor would "
                   "be initialised at random) (model.path): missing 1 key(s): proj_out.bias"]


def test_a_sharded_checkpoint_passes_whole_and_a_tensor_its_index_places_in_a_shard_that_lacks_it_is_named(files,
                                                                                                             tmp_path):
    state = load_file(str(files["full"] / "transformer" / WEIGHTS))
    names = sorted(state)
    ckpt = tmp_path / "sharded"
    ckpt.mkdir()
    shutil.copy(files["full"] / "transformer" / "config.json", ckpt / "config.json")
    shards = {"part-1.safetensors": names[: len(names) // 2], "part-2.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(ckpt / shard))
    index = ckpt / f"{WEIGHTS}.index.json"
    index.write_text(json.dumps({"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    out = tmp_path / "run"
    assert run_file_problems(_config(files, out, f"model.checkpoint={ckpt}")) == []
    dropped = shards["part-2.safetensors"][0]
    save_file({k: state[k] for k in shards["part-2.safetensors"][1:]}, str(ckpt / "part-2.safetensors"))
    assert run_file_problems(_config(files, out, f"model.checkpoint={ckpt}")) == [
        f"{ckpt / 'part-2.safetensors'} lacks {dropped}, which {index.name} places in it (model.checkpoint)"]


def test_a_resume_folder_with_an_extra_key_is_one_line(files, tmp_path, capsys):
    step = _copy(files["full"], tmp_path / "run-before" / "checkpoints" / "step-2")
    _rewrite(step / "transformer" / WEIGHTS, lambda s: s.update({"extra_head.weight": torch.zeros(3)}))
    code, err = _train(files, tmp_path, capsys, "steps=4", resume=str(step))
    assert code == 2
    assert err == [f"error: {step / 'transformer' / WEIGHTS} does not match the transformer of model.path (--resume): "
                   "1 unexpected key(s): extra_head.weight"]


def test_resuming_a_lora_run_with_another_rank_or_from_full_weights_is_one_line(files, tmp_path, capsys):
    code, err = _train(files, tmp_path / "a", capsys, "steps=4", "model.trainable=lora", "model.lora_rank=8",
                       resume=str(files["lora"]))
    adapter = files["lora"] / "transformer" / "lora" / "pytorch_lora_weights.safetensors"
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {adapter} does not match the rank-8 LoRA adapter that model.lora_rank asks for "
                             "(--resume): ")
    saved = load_file(str(adapter))
    name = sorted(k for k in saved if k.endswith("lora_A.weight"))[0]
    rows, cols = saved[name].shape
    assert rows == LORA_RANK and f"{name} ({rows}, {cols}) vs (8, {cols})" in err[0]
    code, err = _train(files, tmp_path / "b", capsys, "steps=4", "model.trainable=lora", resume=str(files["full"]))
    assert code == 2
    assert err == [f"error: {files['full'] / 'transformer' / 'lora' / 'pytorch_lora_weights.safetensors'} does not "
                   "exist: --resume needs a checkpoint of a LoRA run for model.trainable=lora (this one holds full "
                   "weights only)"]


def test_a_prm_weights_file_that_does_not_match_its_config_is_one_line(files, tmp_path, capsys):
    prm = _copy(files["prm"], tmp_path / "prm")
    _rewrite(prm / "model.safetensors", lambda s: s.pop("pool.query"))
    code, err = _train(files, tmp_path, capsys, f"rewards.prm.path={prm}")
    assert code == 2
    assert err == [f"error: {prm / 'model.safetensors'} does not match its config.json (rewards.prm.path): "
                   "missing 1 key(s): pool.query"]


# ---------------------------------------------------------------------------------------------- architecture
def test_a_prm_folder_whose_config_names_another_architecture_is_one_line(files, tmp_path, capsys):
    """The mistake this catches: rewards.prm.path pointed at a transformer folder (or any other model)."""
    prm = _copy(files["prm"], tmp_path / "prm")
    config = json.loads((prm / "config.json").read_text())
    (prm / "config.json").write_text(json.dumps({**config, "_class_name": "HunyuanVideoTransformer3DModel"}))
    code, err = _train(files, tmp_path, capsys, f"rewards.prm.path={prm}")
    assert code == 2
    assert err == [f"error: {prm / 'config.json'} names architecture 'HunyuanVideoTransformer3DModel', but "
                   "rewards.prm.kind 'latent' loads a LatentPRM (is rewards.prm.path the PRM folder?)"]


def test_a_policy_transformer_of_another_architecture_is_one_line(files, tmp_path, capsys):
    model = _copy(files["model"], tmp_path / "model")
    config = json.loads((model / "transformer" / "config.json").read_text())
    (model / "transformer" / "config.json").write_text(json.dumps({**config, "_class_name": "WanTransformer3DModel"}))
    code, err = _train(files, tmp_path, capsys, f"model.path={model}")
    assert code == 2
    assert err == [f"error: {model / 'transformer' / 'config.json'} names architecture 'WanTransformer3DModel', but "
                   "model.family 'hunyuanvideo' loads a HunyuanVideoTransformer3DModel"]


def test_several_bad_files_are_one_line_each(files, tmp_path, capsys):
    prm = _copy(files["prm"], tmp_path / "prm")
    size = _truncate(prm / "model.safetensors")
    ckpt = _copy(files["full"] / "transformer", tmp_path / "ckpt")
    _rewrite(ckpt / WEIGHTS, lambda s: s.pop("proj_out.bias"))
    code, err = _train(files, tmp_path, capsys, f"rewards.prm.path={prm}", f"model.checkpoint={ckpt}")
    assert code == 2
    assert err == [
        f"error: {ckpt / WEIGHTS} does not match the transformer of model.path (model.checkpoint): missing 1 key(s): "
        "proj_out.bias",
        f"error: {prm / 'model.safetensors'} is {size // 2} bytes but its header describes {size} (truncated or "
        "overwritten) (rewards.prm.path)",
    ]


# ------------------------------------------------------------------------------------------------ group size
def test_group_size_one_is_refused_at_config_validation_with_one_line(files, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(_config(files, tmp_path / "run").to_yaml().replace("group_size: 8", "group_size: 1"))
    assert main(["--config", str(config), "--no-env"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: invalid config: sampler.group_size=1: GRPO learns from the differences between the samples of a "
        "group, so a group of one has zero advantage and trains nothing; use 2 or more"]
    assert not (tmp_path / "run").exists() and not ray.is_initialized()
