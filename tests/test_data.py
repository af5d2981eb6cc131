"""The prompt-embedding dataset (upstream's videos2caption.json layout) and the prompts-file reader.

The end-to-end test preprocesses a 3-line prompts file with tiny encoders, reads it through the dataset and runs
the policy on it: the path a training run takes from a user's prompts to the first velocity.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from euphonium_ray.data import DataError, PromptEmbeddingDataset, collate, pooled_dim_of, read_prompts_file
from euphonium_ray.models.base import TextConditioning
from euphonium_ray.models.hunyuan import HunyuanVideoPolicy
from euphonium_ray.models.tiny import build_tiny_hunyuan
from euphonium_ray.preprocess import preprocess_prompts

PROMPTS = ["a red square moving left", "a blue circle moving up", "a green triangle moving down"]
D, P, L = 12, 6, 5


def write_layout(root: Path, n: int, relative: bool) -> Path:
    """A hand-made videos2caption.json with known tensors (row 0 = i, rows 1: = 100·i + row index)."""
    (root / "prompt_embed").mkdir(parents=True)
    (root / "prompt_attention_mask").mkdir()
    entries = []
    for i in range(n):
        embed = torch.arange(L + 1, dtype=torch.float32)[:, None].repeat(1, D) + 100 * i
        embed[0] = float(i)
        torch.save(embed, root / "prompt_embed" / f"{i}.pt")
        torch.save(torch.tensor([1] * (L - i) + [0] * i), root / "prompt_attention_mask" / f"{i}.pt")
        base = Path(".") if relative else root
        entries.append({"prompt_embed_path": str(base / "prompt_embed" / f"{i}.pt"),
                        "prompt_attention_mask": str(base / "prompt_attention_mask" / f"{i}.pt"),
                        "caption": f"prompt {i}"})
    (root / "videos2caption.json").write_text(json.dumps(entries))
    return root / "videos2caption.json"


@pytest.mark.parametrize("relative", [False, True])
def test_dataset_reads_absolute_and_relative_paths_and_collates_upstream_rows(tmp_path, relative):
    index = write_layout(tmp_path / "emb", 3, relative)
    ds = PromptEmbeddingDataset(index, pooled_dim=P)
    assert len(ds) == 3 and ds.captions == ["prompt 0", "prompt 1", "prompt 2"]
    item = ds[1]
    assert item.prompt_embed.shape == (L + 1, D) and item.caption == "prompt 1"
    cond, captions = ds.conditioning([2, 0])
    assert isinstance(cond, TextConditioning) and captions == ["prompt 2", "prompt 0"]
    assert cond.prompt_embeds.shape == (2, L, D) and cond.pooled.shape == (2, P) and cond.attention_mask.shape == (2, L)
    torch.testing.assert_close(cond.pooled, torch.tensor([[2.0] * P, [0.0] * P]))
    torch.testing.assert_close(cond.prompt_embeds[0, :, 0], torch.arange(1, L + 1, dtype=torch.float32) + 200)
    assert cond.attention_mask[0].tolist() == [1, 1, 1, 0, 0]


def test_collate_needs_the_pooled_size(tmp_path):
    ds = PromptEmbeddingDataset(write_layout(tmp_path / "emb", 1, False))
    with pytest.raises(DataError, match="pooled_dim"):
        collate([ds[0]], pooled_dim=None)


def test_missing_embedding_file_names_the_json_and_the_path(tmp_path):
    index = write_layout(tmp_path / "emb", 2, False)
    gone = tmp_path / "emb" / "prompt_embed" / "1.pt"
    gone.unlink()
    ds = PromptEmbeddingDataset(index, pooled_dim=P)
    with pytest.raises(DataError) as err:
        ds[1]
    assert str(index) in str(err.value) and str(gone) in str(err.value)


def test_wrong_embedding_shapes_name_the_file_and_shape(tmp_path):
    index = write_layout(tmp_path / "emb", 2, False)
    embed_path = tmp_path / "emb" / "prompt_embed" / "0.pt"
    torch.save(torch.zeros(3, 4, 5), embed_path)
    mask_path = tmp_path / "emb" / "prompt_attention_mask" / "1.pt"
    torch.save(torch.ones(L + 3), mask_path)
    ds = PromptEmbeddingDataset(index, pooled_dim=P)
    with pytest.raises(DataError, match=rf"{embed_path}.*\(3, 4, 5\)"):
        ds[0]
    with pytest.raises(DataError, match=rf"{mask_path}.*got shape \({L + 3},\)"):
        ds[1]


def test_pickled_objects_are_refused(tmp_path):
    index = write_layout(tmp_path / "emb", 1, False)
    torch.save({"not": "a tensor", "obj": object()}, tmp_path / "emb" / "prompt_embed" / "0.pt")
    with pytest.raises(DataError, match="cannot read the prompt embedding"):
        PromptEmbeddingDataset(index)[0]


def test_bad_index_files_are_named(tmp_path):
    with pytest.raises(DataError, match="embedding index not found"):
        PromptEmbeddingDataset(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"caption": "x"}]))
    with pytest.raises(DataError, match=rf"{bad}: entry 0 lacks prompt_embed_path, prompt_attention_mask"):
        PromptEmbeddingDataset(bad)


def test_read_prompts_file_strips_and_skips_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("  first  \n\n\t\nsecond\n")
    assert read_prompts_file(path) == ["first", "second"]
    path.write_text("\n \n")
    with pytest.raises(DataError, match=f"prompts file {path} contains no prompts"):
        read_prompts_file(path)


def test_three_line_prompts_file_is_preprocessed_and_trains_one_grpo_step(tmp_path):
    """prompts.txt -> `preprocess` with tiny encoders -> dataset -> SDE rollouts through the real VAE decode ->
    advantages -> one clipped-GRPO update that changes the weights, first ratio exactly 1."""
    from euphonium_ray.config import RunConfig
    from euphonium_ray.learning import compute_advantages, grpo_update
    from euphonium_ray.sampling import make_generators, sample_trajectories

    model_dir = build_tiny_hunyuan(tmp_path / "model", PROMPTS, text_dim=32, pooled_dim=16, latent_channels=4)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    index = preprocess_prompts(model_dir, prompts, tmp_path / "emb", max_tokens=16, progress=False)

    policy = HunyuanVideoPolicy.from_pretrained(model_dir)
    assert pooled_dim_of(model_dir) == policy.pooled_dim == 16
    ds = PromptEmbeddingDataset(index, pooled_dim=policy.pooled_dim)
    cond, captions = ds.conditioning(range(len(ds)))
    assert captions == PROMPTS and cond.prompt_embeds.shape == (3, 16, 32)

    cfg = RunConfig()
    cfg.sampler.num_steps, cfg.sampler.group_size, cfg.rgg.enabled = 4, 2, False
    cfg.optim.lr, cfg.optim.grad_accum = 1e-3, 6
    latent_shape = tuple(policy.codec.latent_shape(5, 16, 16))
    traj = sample_trajectories(policy, cond.repeat_interleave(2), sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa,
                               prm=None, latent_shape=latent_shape, group_size=2,
                               generator=make_generators(range(6)), same_initial_noise=False)
    video = policy.codec.decode(traj.x0_hat_final)  # the real AutoencoderKLHunyuanVideo decode
    reward = video.float().flatten(1).mean(1)  # a pixel-space outcome score: mean brightness
    adv = compute_advantages(traj, reward, None, cfg)
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    stats = grpo_update(policy, torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.optim.lr), traj, adv.terms,
                        cfg, torch.Generator().manual_seed(0))
    assert abs(stats["first_ratio_min"] - 1) < 1e-6 and abs(stats["first_ratio_max"] - 1) < 1e-6
    assert stats["num_updates"] == 1 and stats["num_transitions"] == 6 * int(3 * 0.6)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.trainable_parameters()))
