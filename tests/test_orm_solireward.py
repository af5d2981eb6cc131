"""SoliReward-style ORM on a tiny InternVL built with the real transformers classes, saved and loaded the user's way."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch import nn

from euphonium_ray.config import ORMConfig, RewardsConfig, RunConfig, ToyConfig
from euphonium_ray.models.base import OutcomeRewardModel
from euphonium_ray.models.frames import FrameSamplingError, segment_centre_indices
from euphonium_ray.registry import ORMS
from euphonium_ray.models.orm_solireward import (
    REWARD_CONFIG_FILE,
    REWARD_HEAD_FILE,
    HPQAHead,
    ORMCheckpointError,
    RewardHeadConfig,
    SoliRewardORM,
)

torch.set_num_threads(1)

FRAMES, SIZE, PATCH = 4, 56, 14  # 4 frames of one 56×56 tile → (56/14)² · 0.5² = 4 LLM tokens per frame
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_orm(orm: ORMConfig, device: str = "cpu", toy: ToyConfig | None = None):
    """The ORM a run with this ``rewards.orm`` section gets, through the one registry (``registry.ORMS``)."""
    return ORMS.build(orm.backend, RunConfig(rewards=RewardsConfig(orm=orm), toy=toy or ToyConfig()), device)
CAPTIONS = ["red", "a green circle moving left", "a blue triangle moving up and then right, quickly and slowly"]


def tiny_internvl_tokenizer():
    """A byte-level BPE Qwen2 tokenizer trained in code, with the special tokens InternVL's processor names."""
    from transformers import Qwen2Tokenizer

    corpus = ["good bad video frame physics prompt assess square circle triangle moving left right up"] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(
        vocab=spec["vocab"],
        merges=[tuple(m) for m in spec["merges"]],
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    )
    tok.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>"]}, replace_extra_special_tokens=False)
    tok.chat_template = CHATML
    return tok


def tiny_solireward(prompt_variant: str = "deformity_physics", seed: int = 0) -> SoliRewardORM:
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    tok = tiny_internvl_tokenizer()
    config = InternVLConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=SIZE, patch_size=PATCH, initializer_range=0.2),
        text_config=dict(model_type="qwen2", hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, vocab_size=len(tok),
                         max_position_embeddings=1024, initializer_range=0.2),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    head_config = RewardHeadConfig(hidden_size=32, layers=[1, 2, 3], num_heads=8, num_frames=FRAMES, image_size=SIZE)
    head = HPQAHead(head_config)
    with torch.no_grad():  # a trained head spreads scores over a few units; default init keeps them within 1e-3
        head.reward_head[3].weight.mul_(100.0)
    return SoliRewardORM(model, tok, head, head_config, prompt_variant=prompt_variant)


def videos(batch: int = 3, frames: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, 20, 28, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def orm() -> SoliRewardORM:
    return tiny_solireward()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, orm) -> Path:
    return orm.save_pretrained(tmp_path_factory.mktemp("ckpt") / "solireward-tiny")


def orm_config(path: Path, **kw) -> ORMConfig:
    return ORMConfig(backend="solireward", path=str(path), num_frames=FRAMES, image_size=SIZE, dtype="fp32", **kw)


# ------------------------------------------------------------------------------------------- round trip
def test_checkpoint_folder_has_the_documented_layout_and_reloads_with_transformers(checkpoint):
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    names = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
            REWARD_HEAD_FILE, REWARD_CONFIG_FILE} <= names
    assert InternVLForConditionalGeneration.from_pretrained(str(checkpoint)).config.image_seq_length == 4
    assert AutoTokenizer.from_pretrained(str(checkpoint)).context_image_token == "<IMG_CONTEXT>"
    assert set(load_file(str(checkpoint / REWARD_HEAD_FILE))) == set(HPQAHead(RewardHeadConfig(
        hidden_size=32, layers=[1, 2, 3])).state_dict())


def test_saved_checkpoint_loaded_through_build_orm_scores_like_the_original(orm, checkpoint):
    loaded = build_orm(orm_config(checkpoint), "cpu")
    assert isinstance(loaded, SoliRewardORM) and isinstance(loaded, OutcomeRewardModel)
    v = videos()
    before, after = orm.score(v, CAPTIONS), loaded.score(v, CAPTIONS)
    assert after.shape == (3,) and after.dtype == torch.float32 and torch.isfinite(after).all()
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["deformity_physics", "ta"])
def test_batched_scores_equal_one_at_a_time(checkpoint, variant):
    scorer = SoliRewardORM.from_pretrained(checkpoint, prompt_variant=variant, batch_size=3)
    v = videos()
    batched = scorer.score(v, CAPTIONS)
    single = torch.cat([scorer.score(v[i : i + 1], CAPTIONS[i : i + 1]) for i in range(3)])
    assert (batched.max() - batched.min()) > 1e-2  # the videos score differently, so the comparison means something
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    if variant == "ta":  # captions of different lengths: the batch was right-padded
        lengths = scorer.build_inputs(v, CAPTIONS)["attention_mask"].sum(1)
        assert len(set(lengths.tolist())) == 3


def test_only_the_sampled_frames_change_the_score(orm):
    v = videos(batch=1, frames=9)
    picked = set(segment_centre_indices(9, FRAMES))
    unpicked = next(f for f in range(9) if f not in picked)
    base = orm.score(v, CAPTIONS[:1])
    other = v.clone()
    other[:, :, unpicked] = -other[:, :, unpicked]
    torch.testing.assert_close(orm.score(other, CAPTIONS[:1]), base, rtol=0, atol=0)
    other[:, :, min(picked)] = -other[:, :, min(picked)]
    assert (orm.score(other, CAPTIONS[:1]) - base).abs().item() > 1e-4


# -------------------------------------------------------------------------------------------- the prompt
def test_prompt_has_one_tile_of_image_tokens_per_frame_and_the_variants_differ_by_caption(orm, checkpoint):
    tokens_per_tile = (SIZE // PATCH) ** 2 // 4  # pixel shuffle with downsample_ratio 0.5
    ta = SoliRewardORM.from_pretrained(checkpoint, prompt_variant="ta")
    for scorer, has_caption in ((orm, False), (ta, True)):
        ids = scorer.build_inputs(videos(batch=1), CAPTIONS[:1])["input_ids"][0].tolist()
        toks = scorer.tokenizer.convert_ids_to_tokens(ids)
        assert toks.count("<img>") == toks.count("</img>") == FRAMES
        assert toks.count("<IMG_CONTEXT>") == FRAMES * tokens_per_tile
        text = scorer.prompt_text(CAPTIONS[0])
        assert [f"Frame{k + 1}: <img>" in text for k in range(FRAMES)] == [True] * FRAMES
        assert text.endswith("<|im_start|>assistant\n")
        assert (CAPTIONS[0] in text) is has_caption


# -------------------------------------------------------------------------------------------- the head
def _attend(query: torch.Tensor, seq: torch.Tensor, mha: nn.MultiheadAttention, keep: torch.Tensor) -> torch.Tensor:
    """Multi-head attention written out: softmax(q k^T / sqrt(d)) v per head over kept keys, then out_proj."""
    h, heads = query.shape[-1], mha.num_heads
    wq, wk, wv = mha.in_proj_weight.split(h)
    bq, bk, bv = mha.in_proj_bias.split(h)
    q, k, v = query @ wq.T + bq, seq @ wk.T + bk, seq @ wv.T + bv
    d = h // heads
    out = []
    for i in range(heads):
        sl = slice(i * d, (i + 1) * d)
        logits = (q[:, :, sl] @ k[:, :, sl].transpose(1, 2)) / math.sqrt(d)
        logits = logits.masked_fill(~keep[:, None, :], float("-inf"))
        out.append(torch.softmax(logits, -1) @ v[:, :, sl])
    return torch.cat(out, -1) @ mha.out_proj.weight.T + mha.out_proj.bias


def test_hpqa_head_equals_hand_written_progressive_attention():
    torch.manual_seed(3)
    cfg = RewardHeadConfig(hidden_size=16, layers=[1, 3, 4], num_heads=4)
    head = HPQAHead(cfg).eval()
    states = [torch.randn(2, 7, 16) for _ in range(5)]
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    keep = mask.bool()
    with torch.no_grad():
        got = head(states, mask)
        first = head.attention_query_first_layer
        q = _attend(first.query.weight[None].expand(2, 1, 16), states[1], first.attention[0], keep)
        for mha, layer in zip(head.attention_query_other_layers, [3, 4]):
            q = _attend(q, states[layer], mha, keep)
        final = head.attention_query_final_layer
        pooled = q[:, 0] + _attend(final.query.weight[None].expand(2, 1, 16), states[-1], final.attention[0], keep)[:, 0]
        lin1, lin2 = head.reward_head[0], head.reward_head[3]
        want = (torch.nn.functional.silu(pooled @ lin1.weight.T + lin1.bias) @ lin2.weight.T)[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # padded positions are ignored: changing them leaves the padded sample's score as it was
    states2 = [s.clone() for s in states]
    for s in states2:
        s[1, 4:] = 100.0
    with torch.no_grad():
        torch.testing.assert_close(head(states2, mask), got, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- bad input
def test_video_shorter_than_the_frames_asked_for_is_a_clear_error(orm):
    with pytest.raises(FrameSamplingError, match=r"3 frames, fewer than the 4 frames"):
        orm.score(videos(batch=1, frames=3), CAPTIONS[:1])


def test_captions_must_match_the_batch(orm):
    with pytest.raises(FrameSamplingError, match=r"one caption per video \(3\), got 2 captions"):
        orm.score(videos(), CAPTIONS[:2])


def test_missing_checkpoint_folder_is_named(tmp_path):
    missing = tmp_path / "no-such-orm"
    with pytest.raises(ORMCheckpointError, match=f"checkpoint folder not found: {missing}"):
        build_orm(orm_config(missing))


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "copy"))


@pytest.mark.parametrize("name", [REWARD_HEAD_FILE, REWARD_CONFIG_FILE, "config.json", "model.safetensors"])
def test_folder_missing_a_checkpoint_file_names_it(checkpoint, tmp_path, name):
    folder = _copy(checkpoint, tmp_path)
    (folder / name).unlink()
    expected = f"{folder}: no model.safetensors" if name == "model.safetensors" else f"{folder / name} is missing"
    with pytest.raises(ORMCheckpointError, match=expected):
        build_orm(orm_config(folder))


def test_reward_head_with_missing_and_extra_keys_names_them(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    state = load_file(str(folder / REWARD_HEAD_FILE))
    state.pop("reward_head.3.weight")
    state["reward_head.9.bias"] = torch.zeros(1)
    save_file(state, str(folder / REWARD_HEAD_FILE))
    with pytest.raises(ORMCheckpointError, match=r"missing keys \['reward_head.3.weight'\]; unexpected keys "
                                                 r"\['reward_head.9.bias'\]"):
        SoliRewardORM.from_pretrained(folder)


def test_reward_head_with_a_wrongly_shaped_tensor_names_the_key(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    state = load_file(str(folder / REWARD_HEAD_FILE))
    state["reward_head.0.bias"] = torch.zeros(7)
    save_file(state, str(folder / REWARD_HEAD_FILE))
    with pytest.raises(ORMCheckpointError, match=r"key 'reward_head.0.bias' has shape \(7,\)"):
        SoliRewardORM.from_pretrained(folder)


def test_reward_config_pointing_past_the_llm_names_the_layers_key(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    cfg = json.loads((folder / REWARD_CONFIG_FILE).read_text())
    cfg["layers"] = [1, 2, 9]
    (folder / REWARD_CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ORMCheckpointError, match=r"reward_config.json layers has 9, outside the LLM's hidden states 0..3"):
        SoliRewardORM.from_pretrained(folder)
    cfg["layers"], cfg["num_head"] = [1], 8
    (folder / REWARD_CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ORMCheckpointError, match=r"reward_config.json: num_head: Extra inputs are not permitted"):
        SoliRewardORM.from_pretrained(folder)


def test_upstream_style_folder_is_told_to_convert(tmp_path):
    folder = tmp_path / "physics-deformity-HPQA-InternVL3-1B"
    folder.mkdir()
    (folder / "training_config.json").write_text("{}")
    (folder / "config.json").write_text(json.dumps({"model_type": "internvl_chat"}))
    with pytest.raises(ORMCheckpointError, match="upstream SoliReward checkpoint, which needs converting"):
        SoliRewardORM.from_pretrained(folder)


def test_frame_size_that_the_vision_tower_does_not_take_is_named(checkpoint):
    with pytest.raises(ORMCheckpointError, match=r"frames of 448×448 asked for \(rewards.orm.image_size\).*56×56"):
        build_orm(ORMConfig(backend="solireward", path=str(checkpoint), num_frames=FRAMES, image_size=448))


def test_unknown_prompt_variant_is_named(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    cfg = json.loads((folder / REWARD_CONFIG_FILE).read_text())
    del cfg["prompts"]["ta"]
    (folder / REWARD_CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ORMCheckpointError, match=r"prompt_variant='ta' is not among the prompts"):
        build_orm(orm_config(folder, prompt_variant="ta"))


def test_registry_dispatches_toy_backend_to_the_shapes_world_judge():
    from euphonium_ray.toy.orm import ToyPixelORM

    toy = ToyConfig()
    orm = build_orm(ORMConfig(backend="toy"), "cpu", toy=toy)
    assert isinstance(orm, ToyPixelORM)
    v = torch.rand(2, 3, toy.frames, toy.size, toy.size) * 2 - 1
    captions = ["a red square moving left", "a blue circle moving up"]
    torch.testing.assert_close(orm.score(v, captions), ToyPixelORM.from_config(toy).score(v, captions))
