"""Checkpoints: diffusers-loadable transformer, exact AdamW round trip, atomic writes, keep-last-K, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel

import euphonium_ray.checkpoint as ckpt
from euphonium_ray.checkpoint import (
    CheckpointError,
    config_hash,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from euphonium_ray.config import RunConfig
from euphonium_ray.models.base import TextConditioning
from euphonium_ray.models.hunyuan import HunyuanVideoPolicy, PolicyLoadError
from euphonium_ray.models.tiny import build_tiny_transformer

D, P, C = 16, 8, 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("model")
    build_tiny_transformer(root / "transformer", in_channels=C, text_dim=D, pooled_dim=P)
    return root


def load_policy(model_dir: Path, **kw) -> HunyuanVideoPolicy:
    return HunyuanVideoPolicy.from_pretrained(model_dir, with_codec=False, **kw)


def batch(seed: int = 0) -> tuple[torch.Tensor, TextConditioning]:
    g = torch.Generator().manual_seed(seed)
    cond = TextConditioning(torch.randn(2, 5, D, generator=g), torch.ones(2, 5, dtype=torch.int64),
                            torch.randn(2, P, generator=g))
    return torch.randn(2, C, 2, 4, 4, generator=g), cond


def train_step(policy: HunyuanVideoPolicy, opt: torch.optim.Optimizer, seed: int) -> None:
    x, cond = batch(seed)
    loss = policy.velocity(x, torch.tensor([0.3, 0.8]), cond).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def adamw(policy: HunyuanVideoPolicy) -> torch.optim.AdamW:
    return torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2, weight_decay=1e-4, betas=(0.9, 0.99))


def test_checkpoint_transformer_loads_with_diffusers_and_state_is_stored(model_dir, tmp_path):
    policy = load_policy(model_dir)
    opt = adamw(policy)
    train_step(policy, opt, 0)
    cfg = RunConfig()
    path = save_checkpoint(tmp_path, 7, policy, opt, {"config_hash": config_hash(cfg), "weight_version": 7,
                                                      "seed": 42})
    assert path == tmp_path / "checkpoints" / "step-7"
    loaded = HunyuanVideoTransformer3DModel.from_pretrained(path / "transformer")
    for name, tensor in policy.transformer.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 7 and state["weight_version"] == 7 and state["config_hash"] == config_hash(cfg)
    assert (path / "optimizer.safetensors").is_file() and json.loads((path / "optimizer.json").read_text())["class"] == "AdamW"
    assert config_hash(cfg) != config_hash(cfg.model_copy(update={"seed": 1}))


def test_adamw_round_trip_gives_identical_next_step(model_dir, tmp_path):
    policy = load_policy(model_dir)
    opt = adamw(policy)
    for seed in range(3):
        train_step(policy, opt, seed)
    save_checkpoint(tmp_path, 3, policy, opt, {})

    fresh = load_policy(model_dir)
    fresh_opt = adamw(fresh)
    state = load_checkpoint(latest_checkpoint(tmp_path), fresh, fresh_opt)
    assert state["step"] == 3
    saved, restored = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert set(saved) == set(restored)
    for pid, entry in saved.items():
        assert set(entry) == set(restored[pid]) and all(torch.equal(entry[k], restored[pid][k]) for k in entry)
    train_step(policy, opt, 9)
    train_step(fresh, fresh_opt, 9)
    for (name, a), b in zip(policy.transformer.named_parameters(), fresh.transformer.parameters()):
        assert torch.equal(a, b), name


def test_lora_checkpoint_resumes_the_adapter_without_applying_it_twice(model_dir, tmp_path):
    policy = load_policy(model_dir, trainable="lora", lora_rank=2, lora_alpha=2.0)
    opt = adamw(policy)
    for seed in range(2):
        train_step(policy, opt, seed)
    save_checkpoint(tmp_path, 2, policy, opt, {})
    fresh = load_policy(model_dir, trainable="lora", lora_rank=2, lora_alpha=2.0)
    fresh_opt = adamw(fresh)
    load_checkpoint(tmp_path / "checkpoints" / "step-2", fresh, fresh_opt)
    x, cond = batch(5)
    with torch.no_grad():
        torch.testing.assert_close(fresh.velocity(x, 0.5, cond), policy.velocity(x, 0.5, cond), rtol=0, atol=0)
    train_step(policy, opt, 4)
    train_step(fresh, fresh_opt, 4)
    for a, b in zip(policy.trainable_parameters(), fresh.trainable_parameters()):
        assert torch.equal(a, b)


def test_crash_mid_save_leaves_previous_checkpoint_intact(model_dir, tmp_path, monkeypatch):
    policy = load_policy(model_dir)
    opt = adamw(policy)
    train_step(policy, opt, 0)
    first = save_checkpoint(tmp_path, 1, policy, opt, {"tag": "first"})
    files_before = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    train_step(policy, opt, 1)

    def disk_full(*args, **kwargs):  # the transformer is already written when the optimizer write fails
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt, "optimizer_to_files", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 2, policy, opt, {"tag": "second"})
    with pytest.raises(OSError):  # re-saving the same step fails too: the old step-1 must survive
        save_checkpoint(tmp_path, 1, policy, opt, {"tag": "overwrite"})

    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert latest_checkpoint(tmp_path) == first
    assert not (tmp_path / "checkpoints" / "step-2").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-1"]  # no temp folders left
    assert {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()} == files_before


def test_keep_last_k_and_latest(model_dir, tmp_path):
    assert latest_checkpoint(tmp_path) is None
    policy = load_policy(model_dir, trainable="none")
    for step in (5, 10, 15, 20):
        save_checkpoint(tmp_path, step, policy, None, {}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [15, 20]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-20"
    assert resolve_checkpoint(tmp_path, "latest") == latest_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        resolve_checkpoint(tmp_path / "elsewhere", "latest")
    assert json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())["step"] == 20


def test_corrupted_weights_and_missing_state_are_named(model_dir, tmp_path):
    policy = load_policy(model_dir)
    path = save_checkpoint(tmp_path, 1, policy, None, {})
    weights = path / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated mid-file
    with pytest.raises(PolicyLoadError, match=str(weights)):
        load_checkpoint(path, load_policy(model_dir))
    with pytest.raises(CheckpointError, match=str(weights)):
        ckpt.read_transformer_weights(path)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(path, None, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]))
    with pytest.raises(CheckpointError, match=f"no state.json.*{tmp_path}"):
        load_checkpoint(tmp_path)


def test_run_state_that_is_not_json_is_refused_before_writing(model_dir, tmp_path):
    policy = load_policy(model_dir, trainable="none")
    with pytest.raises(CheckpointError, match="run state"):
        save_checkpoint(tmp_path, 1, policy, None, {"rng": torch.zeros(2)})
    assert latest_checkpoint(tmp_path) is None


def test_sharded_diffusers_transformer_folder_is_read_whole(model_dir, tmp_path):
    model = HunyuanVideoTransformer3DModel.from_pretrained(model_dir / "transformer")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")  # how a 13B transformer is saved
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    state = ckpt.read_transformer_weights(tmp_path / "sharded")
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------- --resume latest fallback
def _three_checkpoints(model_dir: Path, root: Path) -> dict[int, Path]:
    policy = load_policy(model_dir)
    opt = adamw(policy)
    train_step(policy, opt, 0)
    return {step: save_checkpoint(root, step, policy, opt, {"seed": 1}) for step in (1, 2, 3)}


def _truncate(file: Path, keep: int | None = None) -> None:
    """Cut a file to ``keep`` bytes (default: half of it, which is past the header and inside the tensor data)."""
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2 if keep is None else keep])


CORRUPTIONS = {
    "weights-truncated-mid-data": (lambda d: _truncate(d / "transformer" / ckpt.WEIGHTS_NAME),
                                   "transformer/diffusion_pytorch_model.safetensors is 64020 bytes but its header "
                                   "describes 128040"),
    "weights-truncated-in-header": (lambda d: _truncate(d / "transformer" / ckpt.WEIGHTS_NAME, 50),
                                    "shorter than its header"),
    "weights-file-missing": (lambda d: (d / "transformer" / ckpt.WEIGHTS_NAME).unlink(),
                             "holds no diffusion_pytorch_model.safetensors"),
    "optimizer-truncated": (lambda d: _truncate(d / ckpt.OPTIMIZER_TENSORS),
                            "optimizer.safetensors is 128968 bytes but"),
    "optimizer-json-missing": (lambda d: (d / ckpt.OPTIMIZER_META).unlink(),
                               "only one of optimizer.safetensors and optimizer.json is there"),
    "optimizer-json-garbled": (lambda d: (d / ckpt.OPTIMIZER_META).write_text('{"class": "Ad'),
                               "optimizer.json is not valid JSON"),
    "state-json-garbled": (lambda d: (d / ckpt.STATE_FILE).write_text("{"), "state.json is not valid JSON"),
    "state-of-another-step": (lambda d: (d / ckpt.STATE_FILE).write_text('{"step": 7}'),
                              "state.json says step 7, the folder name says 3"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_resume_latest_skips_a_corrupt_newest_checkpoint_names_it_and_why_and_takes_the_newest_complete_one(
    model_dir, tmp_path, corruption
):
    paths = _three_checkpoints(model_dir, tmp_path)
    damage, why = CORRUPTIONS[corruption]
    damage(paths[3])
    before = sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file())
    skipped: list[tuple[Path, str]] = []
    assert resolve_checkpoint(tmp_path, "latest", lambda f, w: skipped.append((f, w))) == paths[2]
    [(folder, reason)] = skipped
    assert folder == paths[3] and why in reason, reason
    assert ckpt.checkpoint_problem(paths[2]) is None and ckpt.checkpoint_problem(paths[1]) is None
    # the skipped folder is left as it was (for inspection); nothing on disk changed
    assert sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file()) == before
    # and the checkpoint it picked really loads
    policy = load_policy(model_dir)
    assert load_checkpoint(paths[2], policy, adamw(policy))["step"] == 2


def test_resume_latest_with_every_checkpoint_corrupt_lists_each_and_an_explicit_corrupt_folder_is_refused(
    model_dir, tmp_path
):
    paths = _three_checkpoints(model_dir, tmp_path)
    for path in paths.values():
        _truncate(path / "transformer" / ckpt.WEIGHTS_NAME)
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(tmp_path, "latest")
    message = str(err.value)
    assert message.startswith(f"no complete checkpoint under {tmp_path / 'checkpoints'}: step-3 (transformer/")
    assert all(f"step-{s} (" in message for s in (1, 2, 3)) and "\n" not in message
    with pytest.raises(CheckpointError, match=f"cannot resume from {paths[2]}: transformer/diffusion_pytorch_model."
                                              "safetensors is 64020 bytes but its header describes 128040"):
        resolve_checkpoint(paths[2], "")


def test_a_resumed_run_drops_the_log_records_of_the_steps_it_will_redo(tmp_path):
    """A run killed after step 5 with its newest checkpoint at step 4 resumes at 4: the old records of steps 4 and 5
    go, so each step is logged once; a run that never logged keeps having no file."""
    from euphonium_ray.run_logging import RunLogger

    first = RunLogger(tmp_path, total_steps=8, tensorboard=False, progress=False)
    for step in range(6):
        first.step(step, {"reward/orm_mean": 0.1 * step}, rewards={"orm": [step]})
    first.close()
    again = RunLogger(tmp_path, total_steps=8, start_step=4, tensorboard=False, progress=False)
    again.step(4, {"reward/orm_mean": 0.9})
    again.close()
    steps = [json.loads(line) for line in (tmp_path / "logs" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [0, 1, 2, 3, 4] and steps[-1]["reward/orm_mean"] == 0.9
    rewards = [json.loads(line)["step"] for line in (tmp_path / "logs" / "rewards.jsonl").read_text().splitlines()]
    assert rewards == [0, 1, 2, 3]
    RunLogger(tmp_path / "fresh", total_steps=2, start_step=1, tensorboard=False, progress=False).close()
    assert not (tmp_path / "fresh" / "logs" / "steps.jsonl").exists()
