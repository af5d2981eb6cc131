"""vLLM judge ORM, for real: a tiny Idefics3 vision-language judge built with transformers, served by vLLM (CPU).

vLLM runs from its own environment (``bash scripts/vllm_env.sh`` builds ``.venv-vllm``); the server tests are skipped
only when that environment is absent. Run them in a loopback-only namespace (scripts/loopback.sh): the server binds
127.0.0.1 and runs with the hub and usage reporting off.

Why Idefics3: vLLM's LLaVA, Qwen-VL and InternVL modules import torchvision, whose registry wheels are CUDA builds
that do not load against the CPU torch (see scripts/vllm_env.sh); Idefics3's path needs none of it, takes several
images per prompt, and builds from transformers' classes at any size.
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from euphonium_ray.config import ORMConfig, RewardsConfig, RunConfig, ToyConfig
from euphonium_ray.models.base import OutcomeRewardModel
from euphonium_ray.models.frames import FrameSamplingError, judge_frames
from euphonium_ray.registry import ORMS
from euphonium_ray.models.orm_solireward import DEFAULT_PROMPTS
from euphonium_ray.models.orm_vllm import VLLMJudgeClient, VLLMJudgeError, VLLMJudgeORM, VLLMServer

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
VLLM_VENV = Path(os.environ.get("EUPHONIUM_VLLM_VENV", REPO / ".venv-vllm"))
needs_vllm = pytest.mark.skipif(not (VLLM_VENV / "bin" / "python").is_file(),
                                reason=f"no vLLM environment at {VLLM_VENV} (bash scripts/vllm_env.sh builds it)")

FRAMES, SIZE = 4, 56
CAPTIONS = ["red", "a green circle moving left", "a blue triangle moving up and then right, quickly and slowly"]
# A chat template that renders OpenAI-style content parts (text and images) in order, ChatML-style.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_orm(orm: ORMConfig, device: str = "cpu", toy: ToyConfig | None = None):
    """The ORM a run with this ``rewards.orm`` section gets, through the one registry (``registry.ORMS``)."""
    return ORMS.build(orm.backend, RunConfig(rewards=RewardsConfig(orm=orm), toy=toy or ToyConfig()), device)


def build_tiny_judge(folder: Path) -> Path:
    """Idefics3 (SigLIP tower + Llama) at a tiny config, with its processor, saved by save_pretrained.

    The text attention heads are 32 wide: vLLM's CPU attention kernels take head sizes 32, 64, 80, … only."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, Qwen2Tokenizer
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["good", "bad", "Frame good bad video physics prompt assess square circle triangle moving left"] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=spec["vocab"], merges=[tuple(m) for m in spec["merges"]])
    tok.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>", "<fake_token_around_image>",
                                                     "<image>", "<end_of_utterance>", "<global-img>"]},
                           replace_extra_special_tokens=False)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": SIZE}, max_image_size={"longest_edge": SIZE},
                                                do_image_splitting=False)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                  chat_template=CHAT_TEMPLATE)
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=SIZE, patch_size=14, initializer_range=0.2),
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=len(tok),
                         max_position_embeddings=1024, initializer_range=0.2),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def videos(batch: int = 3, frames: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, 40, 48, generator=g) * 2 - 1


def offline_judge(variant: str = "deformity_physics") -> VLLMJudgeORM:
    """An ORM whose client is never contacted (the model name is given): for checks that happen before any request."""
    return VLLMJudgeORM(VLLMJudgeClient("http://127.0.0.1:9", model="judge"), prompt=DEFAULT_PROMPTS[variant],
                        num_frames=FRAMES, image_size=SIZE)


# ------------------------------------------------------------------------------------- without a server
def test_messages_put_the_instruction_then_one_png_per_frame_after_its_label():
    msgs = offline_judge("ta").messages(torch.rand(FRAMES, 3, SIZE, SIZE), "a red square")
    assert msgs[0] == {"role": "system", "content": DEFAULT_PROMPTS["ta"].system}
    parts = msgs[1]["content"]
    assert parts[0]["text"] == DEFAULT_PROMPTS["ta"].user.replace("{caption}", "a red square")
    assert [p["text"] for p in parts[1::3]] == [f"Frame{k + 1}: " for k in range(FRAMES)]
    assert all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in parts[2::3])
    assert [p["text"] for p in parts[3::3]] == ["\n"] * FRAMES


def test_video_shorter_than_the_frames_asked_for_fails_before_any_request():
    with pytest.raises(FrameSamplingError, match=r"3 frames, fewer than the 4 frames"):
        offline_judge().score(videos(batch=1, frames=3), CAPTIONS[:1])


def test_missing_judge_model_folder_is_named(tmp_path):
    with pytest.raises(VLLMJudgeError, match=f"judge model folder not found or without config.json: {tmp_path / 'x'}"):
        VLLMServer(tmp_path / "x", venv=VLLM_VENV)


def test_missing_vllm_environment_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(VLLMJudgeError, match=r"vLLM environment not found: .*nowhere/bin/python .*scripts/vllm_env.sh"):
        VLLMServer(tmp_path, venv=tmp_path / "nowhere")


def test_unreachable_server_url_is_named():
    with pytest.raises(VLLMJudgeError, match=r"cannot reach the vLLM judge at http://127.0.0.1:9/v1/models"):
        build_orm(ORMConfig(backend="vllm", path="http://127.0.0.1:9"))


# ---------------------------------------------------------------------------------------- with a server
@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    """build_orm on the tiny judge's folder: starts the vLLM server from .venv-vllm (the user's path), stops it after."""
    folder = build_tiny_judge(tmp_path_factory.mktemp("judge") / "tiny-idefics3")
    env = pytest.MonkeyPatch()
    env.setenv("OMP_NUM_THREADS", "1")  # keep the shared machine's cores for others
    orm = build_orm(ORMConfig(backend="vllm", path=str(folder), dtype="fp32", num_frames=FRAMES, image_size=SIZE,
                              vllm={"venv": str(VLLM_VENV), "args": ["--max-num-seqs", "4"]}))
    try:
        yield folder, orm
    finally:
        orm.close()
        env.undo()


@pytest.mark.slow
@needs_vllm
def test_judge_score_is_transformers_logp_good_minus_bad_on_the_same_prompt_and_frames(judge):
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    folder, orm = judge
    assert isinstance(orm, VLLMJudgeORM) and isinstance(orm, OutcomeRewardModel)
    v = videos(batch=1)
    score = orm.score(v, CAPTIONS[:1])
    # What vLLM saw: the prompt token ids of the same chat.
    frames = judge_frames(v, FRAMES, SIZE)[0]
    messages = orm.messages(frames, CAPTIONS[0])
    reply = orm.client._request("/v1/chat/completions", {"model": orm.client.model, "messages": messages,
                                                         "max_tokens": 1, "return_token_ids": True})
    # The same chat through transformers: the images decoded back from the PNGs that were sent.
    images = [Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1])))
              for p in messages[1]["content"] if p["type"] == "image_url"]
    hf_messages = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                    [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]} for m in messages]
    processor = AutoProcessor.from_pretrained(folder)
    text = processor.apply_chat_template(hf_messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[images], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == reply["prompt_token_ids"]
    model = Idefics3ForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        logp = model(**inputs).logits[0, -1].double().log_softmax(-1)
    good, bad = orm.answer_ids()
    assert processor.tokenizer.convert_ids_to_tokens([good, bad]) == ["good", "bad"]
    assert score.shape == (1,) and score.dtype == torch.float32
    assert abs((logp[good] - logp[bad]).item()) > 1e-3  # a tie would make the comparison vacuous
    assert abs(score.item() - (logp[good] - logp[bad]).item()) < 1e-3


@pytest.mark.slow
@needs_vllm
def test_batched_judge_scores_equal_one_at_a_time(judge):
    _, orm = judge
    v = videos()
    batched = orm.score(v, CAPTIONS)
    single = torch.cat([orm.score(v[i : i + 1], CAPTIONS[i : i + 1]) for i in range(3)])
    assert (batched.max() - batched.min()) > 1e-3  # different videos, different scores: the check means something
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-4)


@pytest.mark.slow
@needs_vllm
def test_build_orm_with_a_server_url_scores_like_the_self_started_judge(judge):
    _, orm = judge
    by_url = build_orm(ORMConfig(backend="vllm", path=orm.server.base_url, num_frames=FRAMES, image_size=SIZE))
    assert by_url.server is None  # talks to the running server, starts none
    v = videos(batch=2, seed=1)
    torch.testing.assert_close(by_url.score(v, CAPTIONS[:2]), orm.score(v, CAPTIONS[:2]), rtol=0, atol=1e-4)


@pytest.mark.slow
@needs_vllm
def test_answer_that_is_not_one_token_is_named(judge):
    _, orm = judge
    wordy = VLLMJudgeORM(orm.client, num_frames=FRAMES, image_size=SIZE, answers=("goodness gracious", "bad"))
    with pytest.raises(VLLMJudgeError, match=r"writes the answer 'goodness gracious' as \d+ tokens"):
        wordy.score(videos(batch=1), CAPTIONS[:1])



@pytest.mark.slow
@needs_vllm
def test_server_that_cannot_load_its_model_fails_with_the_log_tail(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    server = VLLMServer(tmp_path, venv=VLLM_VENV, startup_timeout=300)
    with pytest.raises(VLLMJudgeError, match=rf"vLLM server for {tmp_path} exited with code \d+ \(log: .*\):\n"):
        server.start()
    assert server.process is None
    server.log_path.unlink()
