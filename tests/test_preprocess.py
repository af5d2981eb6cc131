"""Prompt preprocessing: tiny text encoders (real transformers classes, saved and reloaded) → upstream's layout.

Shapes, dtypes, names and the json schema are checked by reading the files back; the encoder's rows are checked
against the LLM's and CLIP's own outputs on the tokenised prompt, computed here independently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, CLIPTextModel, LlamaForCausalLM

from euphonium_ray.data import DataError, read_prompts_file
from euphonium_ray.models.text import VIDEO_PROMPT_TEMPLATE, HunyuanTextEncoder, TextEncoderError, template_crop_length
from euphonium_ray.models.tiny import build_tiny_text_side
from euphonium_ray.preprocess import main as preprocess_main
from euphonium_ray.preprocess import preprocess_prompts

PROMPTS = ["a red square moving left", "a blue circle moving up", "a green triangle moving down"]
D, P = 32, 16


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text") / "model"
    build_tiny_text_side(root, PROMPTS, text_dim=D, pooled_dim=P)
    return root


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(f"{PROMPTS[0]}\n\n  {PROMPTS[1]}  \n{PROMPTS[2]}\n")
    return path


def test_text_encoders_round_trip_and_rows_match_the_models(text_dir):
    enc = HunyuanTextEncoder.from_pretrained(text_dir, max_tokens=256)
    out = enc.encode(PROMPTS[:2], out_dtype=torch.float32)
    assert out.prompt_embed.shape == (2, 257, D) and out.prompt_embed.dtype == torch.float32
    assert out.attention_mask.shape == (2, 256) and out.attention_mask.dtype == torch.int64

    # independent recomputation with the raw classes
    tok, llm = AutoTokenizer.from_pretrained(text_dir / "tokenizer"), AutoModel.from_pretrained(text_dir / "text_encoder")
    ids = tok(VIDEO_PROMPT_TEMPLATE.format(PROMPTS[0]), return_tensors="pt")["input_ids"]
    prefix = tok(VIDEO_PROMPT_TEMPLATE.split("{}")[0])["input_ids"]
    crop = len(prefix)
    assert enc.crop == crop
    assert tok.convert_ids_to_tokens(ids[0, crop : crop + 2].tolist()) == ["a", "red"]  # first prompt words survive
    n_real = ids.shape[1] - crop  # prompt tokens + the closing <|eot_id|>
    assert out.attention_mask[0].tolist() == [1] * n_real + [0] * (256 - n_real)
    with torch.no_grad():
        hs = llm(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(out.prompt_embed[0, 1 : 1 + n_real], hs.hidden_states[-3][0, crop:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hs.hidden_states[-3], hs.last_hidden_state)  # skip-2 layer, not the normed output

    tok2, clip = AutoTokenizer.from_pretrained(text_dir / "tokenizer_2"), CLIPTextModel.from_pretrained(text_dir / "text_encoder_2")
    with torch.no_grad():
        pooled = clip(**tok2([PROMPTS[0]], return_tensors="pt")).pooler_output
    torch.testing.assert_close(out.prompt_embed[0, 0, :P], pooled[0], atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(out.prompt_embed[:, 0, P:]) == 0  # zero-padded to D


def test_causal_lm_text_encoder_folder_loads_through_the_same_path(tmp_path):
    build_tiny_text_side(tmp_path / "m", PROMPTS, text_dim=D, pooled_dim=P, causal_lm=True)
    cfg = json.loads((tmp_path / "m" / "text_encoder" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    enc = HunyuanTextEncoder.from_pretrained(tmp_path / "m", max_tokens=16)
    causal = LlamaForCausalLM.from_pretrained(tmp_path / "m" / "text_encoder")
    trained = causal.model.state_dict()  # the decoder weights, not a fresh init, must have been loaded
    assert all(torch.equal(t, trained[k]) for k, t in enc.text_encoder.state_dict().items())
    out = enc.encode(PROMPTS)
    assert out.prompt_embed.shape == (3, 17, D) and out.prompt_embed.dtype == torch.float16


def test_crop_length_is_measured_from_the_template(text_dir):
    tok = AutoTokenizer.from_pretrained(text_dir / "tokenizer")
    short = "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    assert template_crop_length(tok, short) == 4  # BOS + three markers/words
    assert template_crop_length(tok, VIDEO_PROMPT_TEMPLATE) > 40
    with pytest.raises(TextEncoderError, match="exactly one"):
        template_crop_length(tok, "no placeholder")


def test_preprocess_writes_upstream_layout(text_dir, prompts_file, tmp_path):
    out = tmp_path / "emb"
    index = preprocess_prompts(text_dir, prompts_file, out, batch_size=2, progress=False)
    assert index == out.resolve() / "videos2caption.json"
    entries = json.loads(index.read_text())
    assert [e["caption"] for e in entries] == PROMPTS  # file order, blanks skipped, stripped
    enc = HunyuanTextEncoder.from_pretrained(text_dir).encode(PROMPTS)  # fp16, as upstream stores them
    for i, entry in enumerate(entries):
        assert set(entry) == {"prompt_embed_path", "prompt_attention_mask", "caption"}
        assert entry["prompt_embed_path"] == str(out.resolve() / "prompt_embed" / f"{i}.pt")
        assert entry["prompt_attention_mask"] == str(out.resolve() / "prompt_attention_mask" / f"{i}.pt")
        embed = torch.load(entry["prompt_embed_path"], weights_only=True)
        mask = torch.load(entry["prompt_attention_mask"], weights_only=True)
        assert embed.shape == (257, D) and embed.dtype == torch.float16
        assert mask.shape == (256,) and mask.dtype == torch.int64
        torch.testing.assert_close(embed, enc.prompt_embed[i])
        torch.testing.assert_close(mask, enc.attention_mask[i])


def test_preprocess_resumes_and_redoes_only_changed_prompts(text_dir, prompts_file, tmp_path):
    out = tmp_path / "emb"
    preprocess_prompts(text_dir, prompts_file, out, batch_size=8, progress=False)
    files = {i: out / "prompt_embed" / f"{i}.pt" for i in range(3)}
    stamps = {i: f.stat().st_mtime_ns for i, f in files.items()}
    before = {i: torch.load(f, weights_only=True) for i, f in files.items()}
    preprocess_prompts(text_dir, prompts_file, out, batch_size=8, progress=False)
    assert {i: f.stat().st_mtime_ns for i, f in files.items()} == stamps  # nothing re-encoded

    prompts_file.write_text(f"{PROMPTS[0]}\n{PROMPTS[2]}\n{PROMPTS[2]}\n")  # index 1 changes its text
    index = preprocess_prompts(text_dir, prompts_file, out, batch_size=8, progress=False)
    assert files[0].stat().st_mtime_ns == stamps[0] and files[2].stat().st_mtime_ns == stamps[2]
    torch.testing.assert_close(torch.load(files[1], weights_only=True), before[2])
    assert json.loads(index.read_text())[1]["caption"] == PROMPTS[2]
    assert not [p for p in (out / "prompt_embed").iterdir() if p.name.startswith(".")]  # no temp files left


def test_preprocess_cli_writes_index_and_small_max_tokens(text_dir, prompts_file, tmp_path, capsys):
    code = preprocess_main(["--model", str(text_dir), "--prompts", str(prompts_file), "--out", str(tmp_path / "o"),
                            "--max-tokens", "16", "--no-progress"])
    assert code == 0 and "videos2caption.json" in capsys.readouterr().out
    embed = torch.load(tmp_path / "o" / "prompt_embed" / "2.pt", weights_only=True)
    assert embed.shape == (17, D)


def test_empty_prompts_file_is_an_error_naming_it(text_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    with pytest.raises(DataError, match=str(empty)):
        read_prompts_file(empty)
    code = preprocess_main(["--model", str(text_dir), "--prompts", str(empty), "--out", str(tmp_path / "o")])
    assert code == 2 and str(empty) in capsys.readouterr().err
    with pytest.raises(DataError, match="prompts file not found"):
        read_prompts_file(tmp_path / "missing.txt")


def test_model_folder_without_text_encoder_is_named(tmp_path, prompts_file):
    (tmp_path / "m").mkdir()
    with pytest.raises(TextEncoderError, match=str(tmp_path / "m" / "text_encoder")):
        HunyuanTextEncoder.from_pretrained(tmp_path / "m")


@pytest.mark.ray
@pytest.mark.slow
def test_preprocess_over_two_ray_workers_matches_in_process(text_dir, prompts_file, tmp_path):
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    local = preprocess_prompts(text_dir, prompts_file, tmp_path / "local", batch_size=1, progress=False)
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False)
    try:
        distributed = preprocess_prompts(text_dir, prompts_file, tmp_path / "ray", batch_size=1, ray_workers=2,
                                         progress=False)
    finally:
        ray.shutdown()
    a, b = json.loads(local.read_text()), json.loads(distributed.read_text())
    assert [e["caption"] for e in a] == [e["caption"] for e in b] == PROMPTS
    for ea, eb in zip(a, b):
        torch.testing.assert_close(torch.load(ea["prompt_embed_path"], weights_only=True),
                                   torch.load(eb["prompt_embed_path"], weights_only=True))
        torch.testing.assert_close(torch.load(ea["prompt_attention_mask"], weights_only=True),
                                   torch.load(eb["prompt_attention_mask"], weights_only=True))


# ------------------------------------------------------------------------------- prompts past the window
LONG = ("a red square moving left past a blue circle moving up while a green triangle moving down "
        "turns yellow and the blue square moving right")  # 25 words, one token each for the tiny tokenizers


def test_a_prompt_longer_than_the_window_is_named_with_its_dropped_tokens_and_the_index_keeps_what_was_encoded(
    text_dir, tmp_path, capsys
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS[0]}\n{LONG}\n")
    warnings: list[str] = []
    index = preprocess_prompts(text_dir, prompts, tmp_path / "emb", max_tokens=10, save_dtype="fp32",
                               progress=False, warn=warnings.append)
    kept = " ".join(LONG.split()[:10])
    assert warnings == [
        f"prompt 1 ({LONG[:45] + '...'!r}): the text encoder's 10-token window dropped 15 of its 25 tokens "
        f"(videos2caption.json keeps the encoded part, {len(kept)} of {len(LONG)} characters)"
    ]
    entries = json.loads(index.read_text())
    assert [e["caption"] for e in entries] == [PROMPTS[0], kept]
    # the kept caption is what the stored rows encode: encoding it alone gives the same LLM rows and mask
    again = HunyuanTextEncoder.from_pretrained(text_dir, max_tokens=10).encode([kept], out_dtype=torch.float32)
    stored = torch.load(entries[1]["prompt_embed_path"], weights_only=True)
    torch.testing.assert_close(stored[1:], again.prompt_embed[0, 1:])
    assert torch.load(entries[1]["prompt_attention_mask"], weights_only=True).tolist() == [1] * 10

    # the command line says it on stderr, once per cut prompt, and a rerun (nothing re-encoded) says it again
    for _ in range(2):
        code = preprocess_main(["--model", str(text_dir), "--prompts", str(prompts), "--out", str(tmp_path / "cli"),
                                "--max-tokens", "10", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 0 and err.count("warning: prompt 1 (") == 1 and "dropped 15 of its 25 tokens" in err
        assert json.loads((tmp_path / "cli" / "videos2caption.json").read_text())[1]["caption"] == kept


def test_clip_window_overflow_is_named_while_the_llm_keeps_the_whole_prompt(text_dir, tmp_path):
    words = LONG.split() * 4  # 100 words: over CLIP's 75 content tokens, under the LLM's 256 rows
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(" ".join(words) + "\n")
    warnings: list[str] = []
    index = preprocess_prompts(text_dir, prompts, tmp_path / "emb", progress=False, warn=warnings.append)
    [note] = warnings
    assert note.endswith("CLIP's window dropped 25 of 100 tokens") and "text encoder's" not in note
    assert json.loads(index.read_text())[0]["caption"] == " ".join(words)
