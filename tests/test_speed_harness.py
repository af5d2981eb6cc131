"""bench/speed.py end to end at a tiny size on CPU: the same code the GPU session runs (every part: forwards with
the equality checks, whole samplings, reward guidance, LoRA merge and weight sync, the learner's MFU), so that
it cannot fail there for a reason a CPU could have shown. The compile variants go through torch.compile with the
``eager`` backend here (inductor's C++ build of a tiny block takes over a minute on these cores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_speed_harness_runs_every_part_and_checks_outputs_against_plain_diffusers(tmp_path):
    out = tmp_path / "speed"
    cmd = [sys.executable, str(REPO / "bench" / "speed.py"), "--tiny", "--device", "cpu", "--dtype", "fp32",
           "--compile-backend", "eager", "--reps", "1", "--warmup", "1", "--steps", "2", "--threads", "1",
           "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all outputs within tolerance (0.02): True" in done.stdout
    report = json.loads((out / "speed.json").read_text())
    assert (out / "speed.png").is_file()

    assert report["all_within_tolerance"] is True
    assert set(report["tf32"]) == {"cuda.matmul.allow_tf32", "cudnn.allow_tf32", "float32_matmul_precision"}
    assert report["tolerance"]["rel_l2"] == 0.02 and "bf16" in report["tolerance"]["why"]
    assert report["matmul_ceiling"]["tflops"] > 0
    assert set(report["depths"]) == {"full", "half"}
    full, half = report["depths"]["full"], report["depths"]["half"]
    assert full["layers"] == [2, 4] and half["layers"] == [1, 2]
    assert not full["skipped"] and "errors" not in full and "errors" not in half

    forward = full["forward"]
    assert list(forward) == ["plain", "unmasked", "compiled", "lora", "lora_merged"]
    for name in ("unmasked", "compiled"):  # the same function as diffusers': fp32 here, so to fp32 rounding
        assert forward[name]["within_tolerance"] and forward[name]["rel_l2"] < 1e-5
        assert forward[name]["speedup_vs_plain"] > 0 and len(forward[name]["times_s"]) == 1
    assert forward["compiled"]["graphs_compiled"] >= 1  # the blocks really went through torch.compile
    assert forward["lora_merged"]["rel_l2"] < 1e-5  # merged adapters against unmerged ones

    sampling = full["sampling"]
    assert sampling["steps"] == 2 and len(sampling["plain_diffusers"]["steps_s"]) == 2
    assert sampling["ours"]["forwards"] == 2 and sampling["speedup_whole"] > 0

    guidance = full["guidance"]
    assert guidance["guided_steps"] == 2 and 0 < guidance["prm_share_of_rollout"] < 1

    lora = full["lora"]
    assert lora["graphs_compiled_after_weight_sync"] == 0 and lora["after_sync_within_tolerance"]

    learner = full["learner"]
    for variant in ("plain", "compiled"):
        entry = learner[variant]
        assert entry["transitions_per_sample"] >= 1 and entry["flops_per_sample"] > 0
        assert 0 < entry["mfu_vs_datasheet"] < 1 and entry["first_ratio_max"] is not None
    assert learner["compiled"]["graphs_compiled_per_sample"][-1] == 0  # warm after the first sample

    assert list(half["forward"]) == ["plain", "unmasked", "compiled"] and "sampling" in half
    assert "guidance" not in half and "learner" not in half  # --half-parts: forward and sampling only


def test_forward_flop_count_matches_torch_flop_counter_on_a_tiny_model(monkeypatch):
    """The MFU's FLOP formula (written out in bench/speed.forward_flops) against torch's own count of the matmuls
    and convolutions of one forward, plus the attention products counted from every SDPA call's shapes (torch's
    counter has no formula for the CPU attention kernel)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    attention = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(query, key, value, **kwargs):  # (B, H, L, hd): QKᵀ and AV, 2 FLOPs per multiply-add
        q, k, v = query.shape, key.shape, value.shape
        attention.append(2 * q[0] * q[1] * q[2] * k[2] * (q[3] + v[3]))
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)

    sys.path.insert(0, str(REPO))
    from bench.speed import TINY, build_transformer, forward_flops

    transformer = build_transformer(dict(TINY, num_layers=2, num_single_layers=3), torch.device("cpu"),
                                    torch.float32, seed=0)
    batch, latent, tokens = 2, (16, 2, 8, 8), 12
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(batch, *latent, generator=g), timestep=torch.tensor([500, 600]),
                  encoder_hidden_states=torch.randn(batch, tokens, TINY["text_embed_dim"], generator=g),
                  encoder_attention_mask=torch.ones(batch, tokens, dtype=torch.long),
                  pooled_projections=torch.randn(batch, TINY["pooled_projection_dim"], generator=g),
                  guidance=torch.full((batch,), 6018.0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        transformer(**inputs, return_dict=False)
    counted = counter.get_total_flops() + sum(attention)
    assert len(attention) == 2 + 3 + TINY["num_refiner_layers"]  # every block's attention was seen
    formula = forward_flops(transformer.config, batch, latent, tokens)["total"]
    assert abs(formula - counted) / counted < 1e-3, (formula, counted)
