"""train-prm: labels, splits, metrics, and the command end to end on a tiny toy-world model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel

from euphonium_ray.models.prm import LatentPRM
from euphonium_ray.prm_training import (
    LabelledRollouts,
    evaluate_prm,
    make_labels,
    pearson,
    shifted_sigmas,
    spearman,
    split_groups,
)
from euphonium_ray.models.base import TextConditioning

# A toy world small enough for a test: 16×16 frames, 4 frames, latent (48, 4, 4, 4). The model folder records it in
# toy_config.json (as `toy build` does); the command is only told the sampler settings.
TOY_SETS = ["toy.size=16", "toy.frames=4", "toy.radius=[0.2,0.25]", "toy.speed=[0.05,0.06]", "toy.text_dim=16",
            "toy.pooled_dim=8", "toy.text_max_tokens=8"]
RUN_SETS = ["sampler.num_steps=4", "sampler.shift=1.0", "rgg.start=2", "spsa.start=2", "seed=3"]


@pytest.fixture(scope="module")
def tiny_toy_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A model folder in the diffusers layout (random tiny transformer, the toy's pixel-unshuffle codec, tiny text
    encoders) and its prompt embeddings written by the real ``preprocess`` command."""
    from euphonium_ray.config import load_config
    from euphonium_ray.models.tiny import build_tiny_text_side, build_tiny_transformer
    from euphonium_ray.preprocess import preprocess_prompts
    from euphonium_ray.toy.codec import PixelUnshuffleCodec
    from euphonium_ray.toy.data import ShapesWorld
    from euphonium_ray.toy.vocab import vocabulary

    cfg = load_config(None, TOY_SETS, use_env=False).toy
    root = tmp_path_factory.mktemp("toy_model")
    (root / "toy_config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    world = ShapesWorld(cfg)
    codec = PixelUnshuffleCodec(cfg.latent_factor, cfg.latent_shift, cfg.latent_scale)
    codec.save_pretrained(root / "vae")
    build_tiny_transformer(root / "transformer", in_channels=codec.latent_channels, text_dim=cfg.text_dim,
                           pooled_dim=cfg.pooled_dim, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                           num_single_layers=1)
    build_tiny_text_side(root, vocabulary(cfg.shapes, cfg.colors, cfg.directions), text_dim=cfg.text_dim,
                         pooled_dim=cfg.pooled_dim)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(world.prompts[:4]) + "\n")
    index = preprocess_prompts(root, prompts, root / "embeddings", max_tokens=cfg.text_max_tokens, progress=False)
    return root, index


def test_train_prm_runs_end_to_end_and_writes_weights_config_and_metrics(tiny_toy_model, tmp_path: Path) -> None:
    from euphonium_ray.prm_training import main

    model, index = tiny_toy_model
    out = tmp_path / "prm"
    argv = ["--model", str(model), "--prompts", str(index), "--orm", "toy", "--out", str(out), "--rollouts", "16",
            "--group-size", "4", "--epochs", "2", "--batch-size", "16", "--heldout-fraction", "0.25"]
    for item in RUN_SETS:
        argv += ["--set", item]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.json", "model.safetensors"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rollouts"] == {**metrics["rollouts"], "count": 16, "train": 12, "heldout": 4}
    assert metrics["latent_shape"] == [48, 4, 4, 4]  # the folder's 16×16×4 world, not the default config's
    assert 0.0 <= metrics["rollouts"]["orm_min"] <= metrics["rollouts"]["orm_max"] <= 1.0
    steps = [row["step"] for row in metrics["heldout"]["by_step"]]
    assert steps == [0, 1, 2, 3, "x0_hat"]
    assert metrics["heldout"]["by_sigma_bucket"][0]["sigma_range"] == [0.0, 0.0]
    low = metrics["heldout"]["sigma_le_0.6"]  # shift 1, 4 steps: σ = 1, 0.75, 0.5, 0.25 → two steps × 4 rollouts
    assert low["n"] == 8 and -1.0 <= low["pearson"] <= 1.0 and low["constant_mse"] > 0
    assert len(metrics["training"]["loss_history"]) == 2
    prm = LatentPRM.from_pretrained(out)
    assert prm.label["kind"] == "score" and prm.label["orm"] == "toy"
    assert len(prm.backbone.transformer_blocks) == 1 and len(prm.backbone.single_transformer_blocks) == 0
    policy_blocks = json.loads((model / "transformer" / "config.json").read_text())
    assert prm.config["backbone"]["attention_head_dim"] == policy_blocks["attention_head_dim"]


def test_train_prm_reports_bad_inputs_by_name(tiny_toy_model, tmp_path: Path, capsys) -> None:
    from euphonium_ray.prm_training import main

    model, index = tiny_toy_model
    base = ["--orm", "toy", "--out", str(tmp_path / "o")]
    assert main(["--model", str(tmp_path / "missing"), "--prompts", str(index), *base]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["--model", str(model), "--prompts", str(tmp_path / "none.json"), *base]) == 2
    assert "none.json" in capsys.readouterr().err
    assert main(["--model", str(model), "--prompts", str(index), *base, "--rollouts", "1"]) == 2
    assert "--rollouts" in capsys.readouterr().err
    assert main(["--model", str(model), "--prompts", str(index), *base, "--set", "sampler.num_stepz=3"]) == 2
    assert "sampler.num_steps" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ pieces
C, T, H, W = 4, 2, 4, 4


def tiny_policy() -> HunyuanVideoTransformer3DModel:
    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=C, out_channels=C, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=0,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=12, pooled_projection_dim=6,
        rope_axes_dim=(2, 2, 4), guidance_embeds=False,
    ).eval()


def tiny_cond(n: int) -> TextConditioning:
    g = torch.Generator().manual_seed(1)
    return TextConditioning(torch.randn(n, 5, 12, generator=g), torch.ones(n, 5, dtype=torch.int64),
                            torch.randn(n, 6, generator=g))


def test_score_labels_are_the_orm_standardised_with_the_training_split_only() -> None:
    outcome = torch.tensor([0.1, 0.5, 0.9, 0.3, 100.0])
    train = torch.tensor([0, 1, 2, 3])
    labels, info = make_labels(outcome, "score", train)
    ref = outcome[:4]
    torch.testing.assert_close(labels, (outcome - ref.mean()) / ref.std())
    assert info == {"kind": "score", "mean": pytest.approx(0.45), "std": pytest.approx(float(ref.std()))}


def test_binary_labels_pass_at_the_threshold_or_the_training_median() -> None:
    outcome = torch.tensor([0.1, 0.5, 0.9, 0.3])
    labels, info = make_labels(outcome, "binary", torch.arange(4))
    assert labels.tolist() == [0.0, 1.0, 1.0, 1.0] and info["threshold"] == pytest.approx(0.3)
    labels, info = make_labels(outcome, "binary", torch.arange(4), threshold=0.6)
    assert labels.tolist() == [0.0, 0.0, 1.0, 0.0] and info["pass_rate"] == 0.25
    with pytest.raises(ValueError, match="same side"):
        make_labels(outcome, "binary", torch.arange(4), threshold=2.0)
    with pytest.raises(ValueError, match="same ORM score"):
        make_labels(torch.ones(4), "score", torch.arange(4))


def test_held_out_split_keeps_whole_groups_apart() -> None:
    groups = torch.arange(40) // 4
    data = LabelledRollouts(torch.zeros(40, 2, 1, 1, 1, 1), torch.tensor([1.0, 0.5, 0.0]), torch.zeros(40, 1, 1, 1, 1),
                            torch.rand(40), groups, TextConditioning(torch.zeros(40, 1, 1), torch.ones(40, 1),
                                                                     torch.zeros(40, 1)), [""] * 40)
    train, held = split_groups(data, 0.2, seed=0)
    assert len(held) == 8 and len(train) == 32
    assert not set(groups[train].tolist()) & set(groups[held].tolist())
    assert sorted(torch.cat([train, held]).tolist()) == list(range(40))


def test_training_sigmas_follow_the_shifted_schedule_density() -> None:
    """σ = sτ/(1+(s−1)τ) with τ uniform: P(σ ≤ q) = τ(q) = q/(s − (s−1)q)."""
    sig = shifted_sigmas(200_000, 5.0, torch.Generator().manual_seed(0))
    for q in (0.2, 0.5, 0.8):
        expected = q / (5.0 - 4.0 * q)
        assert abs(float((sig <= q).float().mean()) - expected) < 0.005


def test_correlations_match_an_independent_computation() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    b = b + a
    ref = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert pearson(a, b) == pytest.approx(float(ref), abs=1e-6)
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    assert spearman(a, b) == pytest.approx(float(torch.corrcoef(torch.stack([ra, rb]))[0, 1]), abs=1e-6)
    assert spearman(a, a.exp()) == pytest.approx(1.0)


def test_evaluation_buckets_by_sigma_and_measures_a_perfect_predictor_as_perfect() -> None:
    """A PRM whose score is exactly the outcome label (read off the latent) correlates 1 with it at every σ."""

    class ReadsLabel(LatentPRM):
        def forward(self, latents, sigma, cond):  # the label is written in every latent element
            return latents.flatten(1)[:, 0].float()

    prm = ReadsLabel.from_policy(tiny_policy(), 1, 0)
    outcome = torch.linspace(0.0, 1.0, 12)
    labels, _ = make_labels(outcome, "score", torch.arange(12))
    sigmas = torch.tensor([1.0, 0.7, 0.5, 0.1, 0.0])
    states = labels.view(12, 1, 1, 1, 1, 1).expand(12, 4, 1, 1, 1, 1).clone()
    cond = TextConditioning(torch.zeros(12, 1, 1), torch.ones(12, 1), torch.zeros(12, 1))
    data = LabelledRollouts(states, sigmas, labels.view(12, 1, 1, 1, 1).clone(), outcome, torch.arange(12) // 3,
                            cond, [""] * 12)
    rows = torch.arange(12)
    result = evaluate_prm(prm, data, labels, rows, "score", rows)
    assert [r["sigma"] for r in result["by_step"]] == [1.0, 0.7, 0.5, 0.1, 0.0]
    assert all(r["pearson"] == pytest.approx(1.0) and r["mse"] == pytest.approx(0.0, abs=1e-10) for r in result["by_step"])
    assert result["sigma_le_0.6"]["n"] == 24  # steps at σ = 0.5 and 0.1 (the clean x̂0 is reported apart)
    assert result["sigma_le_0.6"]["constant_mse"] > 0.5
    assert result["sigma_le_0.6"]["mean_per_step_pearson"] == pytest.approx(1.0)
    ranges = [b["sigma_range"] for b in result["by_sigma_bucket"]]
    assert ranges == [[0.0, 0.0], [0.0, 0.2], [0.4, 0.6], [0.6, 0.8], [0.8, 1.0]]


def _tiny_rollouts(n: int = 8) -> LabelledRollouts:
    g = torch.Generator().manual_seed(4)
    return LabelledRollouts(torch.randn(n, 3, C, T, H, W, generator=g), torch.tensor([1.0, 0.6, 0.3, 0.0]),
                            torch.randn(n, C, T, H, W, generator=g), torch.rand(n, generator=g),
                            torch.arange(n) // 2, tiny_cond(n), [f"caption {i}" for i in range(n)])


def test_rollouts_file_round_trips_and_a_damaged_one_is_named(tmp_path: Path) -> None:
    from euphonium_ray.prm_training import load_rollouts, save_rollouts

    data = _tiny_rollouts()
    save_rollouts(data, tmp_path / "r.safetensors")
    back = load_rollouts(tmp_path / "r.safetensors")
    torch.testing.assert_close(back.states, data.states, atol=2e-3, rtol=1e-3)  # latents are kept in fp16
    assert torch.equal(back.outcome, data.outcome) and torch.equal(back.group_ids, data.group_ids)
    assert torch.equal(back.cond.prompt_embeds, data.cond.prompt_embeds) and back.captions == data.captions
    (tmp_path / "r.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"rollouts file .*r\.safetensors cannot be read"):
        load_rollouts(tmp_path / "r.safetensors")


def test_backbone_lr_scale_zero_trains_only_the_pooling_and_head() -> None:
    from euphonium_ray.prm_training import PRMTrainOptions, train_prm

    data = _tiny_rollouts()
    labels, _ = make_labels(data.outcome, "score", torch.arange(8))
    prm = LatentPRM.from_policy(tiny_policy(), 1, 0)
    before = {k: v.clone() for k, v in prm.state_dict().items()}
    opts = PRMTrainOptions(epochs=2, batch_size=4, backbone_lr_scale=0.0)
    result = train_prm(prm, data, labels, torch.arange(8), opts, shift=3.0, log=lambda _: None)
    after = prm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("backbone."))
    assert not torch.equal(before["head.3.weight"], after["head.3.weight"])
    assert len(result["loss_history"]) == 2 and result["optimizer_steps"] == 8


def test_binary_label_evaluation_reports_accuracy_and_bce_against_the_pass_rate() -> None:
    class ReadsLogit(LatentPRM):
        def forward(self, latents, sigma, cond):
            return latents.flatten(1)[:, 0].float()

    prm = ReadsLogit.from_policy(tiny_policy(), 1, 0)
    outcome = torch.linspace(0.0, 1.0, 8)
    labels, info = make_labels(outcome, "binary", torch.arange(8), threshold=0.5)
    logits = (labels * 2 - 1) * 4.0  # confident and right
    data = LabelledRollouts(logits.view(8, 1, 1, 1, 1, 1).clone(), torch.tensor([0.3, 0.0]),
                            logits.view(8, 1, 1, 1, 1).clone(), outcome, torch.arange(8) // 2,
                            TextConditioning(torch.zeros(8, 1, 1), torch.ones(8, 1), torch.zeros(8, 1)), [""] * 8)
    result = evaluate_prm(prm, data, labels, torch.arange(8), "binary", torch.arange(8))
    low = result["sigma_le_0.6"]
    assert low["accuracy"] == 1.0 and low["bce"] < 0.02 < low["constant_bce"]
    assert low["constant_bce"] == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-4)  # pass rate 0.5
