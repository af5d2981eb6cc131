"""The full-size one-GPU step (``bench/gpu_fullsize.py``) and what it relies on, checked on CPU at tiny sizes:
the failure diagnosis from CUDA's message, the retry depth, the depth view of the written weights, the PRM's
gradient in micro-batches, the LoRA learner on a bf16 base, and the script itself end to end through Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.fullsize_report import GIB, diagnose_failure, smaller_depth
from euphonium_ray.config import load_config
from euphonium_ray.models.tiny import build_tiny_transformer, build_tiny_vae

ROOT = Path(__file__).resolve().parents[1]
OOM = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.50 GiB. GPU 0 has a total capacity of "
       "139.81 GiB of which 1.25 GiB is free. Process 4242 has 33.10 GiB memory in use. Process 4343 has 20.00 GiB "
       "memory in use. Including non-PyTorch memory, this process has 70.02 GiB memory in use. Of the allocated "
       "memory 66.1 GiB is allocated by PyTorch, and 1.2 GiB is reserved by PyTorch but unallocated.")


# ----------------------------------------------------------------------------------------------- diagnosis
@pytest.mark.parametrize("text, role", [
    (f"RuntimeError: the learner (Ray Train) failed: Training failed due to worker errors:\n[Rank 0]\n{OOM}", "learner"),
    (f"ray.exceptions.RayTaskError(ProcessRewardError): ray::RolloutWorker.sample() ... PRM failed at sampling step "
     f"12: RayTaskError(OutOfMemoryError)(ray::PRMScorer.score_and_grad() ...\n{OOM}", "prm"),
    (f"RoleStartError: ORM actor 0 could not start: {OOM}", "orm"),
    (f"ray.exceptions.RayTaskError(OutOfMemoryError): ray::RolloutWorker.sample() (pid=77)\n{OOM}", "rollout"),
])
def test_an_out_of_memory_failure_names_the_role_and_the_shortfall_from_cudas_message(text, role):
    d = diagnose_failure(text)
    assert d["role"] == role and d["out_of_memory"]
    assert d["asked_bytes"] == 3.5 * GIB and d["free_bytes"] == 1.25 * GIB
    assert d["shortfall_bytes"] == pytest.approx(2.25 * GIB)
    assert d["gpu_total_bytes"] == pytest.approx(139.81 * GIB)
    assert d["processes_bytes"] == {4242: pytest.approx(33.1 * GIB), 4343: pytest.approx(20.0 * GIB)}
    assert d["failing_process_bytes"] == pytest.approx(70.02 * GIB)
    assert "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.50 GiB" in d["message"]


def test_a_failure_that_is_not_memory_has_no_shortfall():
    d = diagnose_failure("RoleStartError: PRM actor 0 could not start: PRMLoadError: PRM folder not found: /x")
    assert d == {"role": "prm", "out_of_memory": False, "shortfall_bytes": None,
                 "message": "RoleStartError: PRM actor 0 could not start: PRMLoadError: PRM folder not found: /x"}


def test_retry_depth_cuts_dual_and_single_blocks_one_to_two_until_the_shortfall_and_margin_are_freed():
    built = {"bytes_per_dual_block": 0.6 * GIB, "bytes_per_single_block": 0.25 * GIB}
    act = 0.4 * GIB
    # each cut of 1 dual + 2 single blocks frees 2*0.6+0.4 + 2*(2*0.25+0.4) = 3.4 GiB; 10 GiB short needs
    # 10*1.2 + 1 = 13 GiB: four cuts (13.6 GiB)
    assert smaller_depth(built, 10 * GIB, 20, 40, activation_bytes_per_block=act) == (16, 32)
    assert smaller_depth(built, 0.0, 20, 40, activation_bytes_per_block=act) == (19, 38)  # the spare GiB alone
    # once the single blocks are gone only dual blocks are cut (1.6 GiB each): 8 GiB short needs 10.6 GiB, the two
    # single blocks give 1.8, six dual blocks 9.6; nothing left to cut gives None
    assert smaller_depth(built, 8 * GIB, 8, 2, activation_bytes_per_block=act) == (2, 0)
    assert smaller_depth(built, 100 * GIB, 8, 2, activation_bytes_per_block=act) is None


# -------------------------------------------------------------------------------------------- depth view
def test_a_depth_view_loads_the_first_blocks_of_the_written_weights(tmp_path):
    from bench.gpu_fullsize import depth_view
    from euphonium_ray.registry import POLICIES

    work = tmp_path / "work"
    build_tiny_transformer(work / "HunyuanVideo" / "transformer", num_layers=3, num_single_layers=4)
    build_tiny_vae(work / "HunyuanVideo" / "vae")
    (work / "HunyuanVideo" / "model_index.json").write_text("{}")
    full = POLICIES.get("hunyuanvideo").from_pretrained(work / "HunyuanVideo", trainable="none").transformer
    view = depth_view(work, 1, 2)
    small = POLICIES.get("hunyuanvideo").from_pretrained(view, trainable="none").transformer
    assert (small.config.num_layers, small.config.num_single_layers) == (1, 2)
    want = {k: v for k, v in full.state_dict().items()
            if not k.startswith(("transformer_blocks.1.", "transformer_blocks.2.", "single_transformer_blocks.2.",
                                 "single_transformer_blocks.3."))}
    got = small.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert depth_view(work, 3, 4) == work / "HunyuanVideo"
    with pytest.raises(SystemExit, match="depth 4/4 exceeds the written model's 3/4"):
        depth_view(work, 4, 4)


# ---------------------------------------------------------------------------------- library pieces it uses
def test_prm_gradient_in_micro_batches_equals_the_whole_batch(tmp_path):
    from euphonium_ray.roles import MicroBatchedPRM, load_prm
    from euphonium_ray.models.base import TextConditioning
    from euphonium_ray.models.prm import LatentPRM

    from diffusers import HunyuanVideoTransformer3DModel

    build_tiny_transformer(tmp_path / "t", num_layers=2, num_single_layers=1)
    transformer = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "t")
    LatentPRM.from_policy(transformer, 1, 0).save_pretrained(tmp_path / "prm")
    cfg = load_config(None, [f"rewards.prm.path={tmp_path / 'prm'}", "rewards.prm.micro_batch=2"], use_env=False)
    chunked = load_prm(cfg, torch.device("cpu"))
    assert isinstance(chunked, MicroBatchedPRM) and chunked.use_sigmoid is False  # the PRM's own attributes pass
    whole = LatentPRM.from_pretrained(tmp_path / "prm")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 2, 4, 4, generator=g)
    sigma = torch.rand(5, generator=g)
    cond = TextConditioning(torch.randn(5, 6, 32, generator=g), torch.ones(5, 6, dtype=torch.long),
                            torch.randn(5, 16, generator=g))
    s1, g1 = chunked.score_and_grad(x, sigma, cond)
    s2, g2 = whole.score_and_grad(x, sigma, cond)
    assert g1.abs().sum() > 0
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


def test_lora_learner_on_a_bf16_base_trains_fp32_adapters_that_load_into_a_bf16_rollout_copy(tmp_path):
    from euphonium_ray.roles import learner_weight_dtype
    from euphonium_ray.models.base import TextConditioning
    from euphonium_ray.registry import POLICIES

    lora_bf16 = load_config(None, ["model.trainable=lora", "model.lora_base_dtype=bf16"], use_env=False)
    assert learner_weight_dtype(lora_bf16, on_gpu=True) == "bf16"
    assert learner_weight_dtype(lora_bf16, on_gpu=False) == "fp32"  # bf16 applies on GPU only, as model.dtype
    assert learner_weight_dtype(load_config(None, ["model.trainable=lora"], use_env=False), on_gpu=True) == "fp32"
    assert learner_weight_dtype(load_config(None, ["model.lora_base_dtype=bf16"], use_env=False), True) == "fp32"

    build_tiny_transformer(tmp_path / "m" / "transformer")
    build_tiny_vae(tmp_path / "m" / "vae")
    cls = POLICIES.get("hunyuanvideo")
    learner = cls.from_pretrained(tmp_path / "m", dtype="bf16", trainable="lora", lora_rank=2, lora_dtype="fp32",
                                  with_codec=False)
    params = dict(learner.transformer.named_parameters())
    assert {p.dtype for n, p in params.items() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in params.items() if "lora_" not in n} == {torch.bfloat16}
    assert {n for n, p in params.items() if p.requires_grad} == {n for n in params if "lora_" in n}
    g = torch.Generator().manual_seed(1)
    cond = TextConditioning(torch.randn(2, 6, 32, generator=g), torch.ones(2, 6, dtype=torch.long),
                            torch.randn(2, 16, generator=g))
    v = learner.velocity(torch.randn(2, 4, 2, 4, 4, generator=g), 0.5, cond)
    v.float().square().mean().backward()
    grads = [p.grad for n, p in params.items() if "lora_B" in n]
    assert grads and all(gr is not None and gr.dtype == torch.float32 and gr.abs().sum() > 0 for gr in grads)
    with torch.no_grad():
        for n, p in params.items():
            if "lora_" in n:
                p.add_(0.01)
    rollout = cls.from_pretrained(tmp_path / "m", dtype="bf16", trainable="lora", lora_rank=2, with_codec=False)
    rollout.load_sync_state_dict(learner.sync_state_dict())
    got = dict(rollout.transformer.named_parameters())
    for n, p in learner.sync_state_dict().items():
        assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], p.to(torch.bfloat16))


# --------------------------------------------------------------------------------------------- end to end
@pytest.mark.ray
@pytest.mark.slow
def test_tiny_cpu_run_of_the_fullsize_script_records_phases_memory_and_loading_of_every_role(tmp_path):
    """The script as the GPU run uses it (own build process, ``driver.train`` on a fresh local Ray, one step),
    at tiny sizes on CPU: it reports every phase, every role's memory and loading seconds, and writes no
    checkpoint or videos after its one step (``output.write_final: false``)."""
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_fullsize.py"), "--tiny", "--device", "cpu", "--out", str(out),
           "--work-dir", str(work), "--deadline-s", "800"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = json.loads((out / "fullsize_1gpu.json").read_text())
    assert [a["ok"] for a in result["attempts"]] == [True]
    a = result["attempts"][0]
    s = a["scalars"]
    for phase in ("rollout", "reward", "advantage", "learn", "broadcast", "step", "policy", "prm"):
        assert s[f"time/{phase}"] >= 0, phase
    assert s["time/step"] >= s["time/rollout"] + s["time/learn"]
    assert s["learner/num_transitions"] > 0 and s["samples/skipped"] == 0 and a["orm_failures"] == 0
    assert [k for k in s if k.startswith("reward/process_step_")] == [f"reward/process_step_{k}" for k in range(12, 16)]
    assert set(a["memory"]) == {"rollout", "prm", "orm"}
    for role, (m,) in a["memory"].items():
        assert m["load_seconds"] > 0 and m["rss_bytes"] > 0 and m["gpu_max_allocated_bytes"] == 0.0, role
    assert a["learner_ready"]["load_seconds"] > 0 and s["learner/gpu_max_allocated_bytes"] == 0.0
    run = work / "run"
    assert not (run / "checkpoints").exists() and not any((run / "samples").glob("*"))
    assert result["build"]["prm"]["dual_blocks"] == 1 and result["build"]["orm"]["size"] == "tiny"
    assert "## Depth 2 dual + 2 single blocks: one step done" in (out / "fullsize_1gpu.md").read_text()
