"""Flow-matching pretraining of the toy policy: the objective, the noise levels, the schedule, and that it learns."""

from __future__ import annotations

import math

import pytest
import torch

from euphonium_ray.config import ToyConfig, load_config
from euphonium_ray.models.base import TextConditioning
from euphonium_ray.models.hunyuan import HunyuanVideoPolicy
from euphonium_ray.sde import sigma_schedule
from euphonium_ray.toy.codec import PixelUnshuffleCodec
from euphonium_ray.toy.data import ShapesWorld
from euphonium_ray.toy.pretrain import flow_matching_loss, lr_at, new_transformer, sample_sigma

SMALL = dict(size=8, frames=3, latent_factor=2, radius=(0.2, 0.25), speed=(0.05, 0.1), text_dim=16, pooled_dim=8,
             heads=1, head_dim=16, dual_layers=1, single_layers=1, colors=["red", "blue"], directions=["left", "up"])


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine run ~20x faster on one thread than on two (no thread hand-offs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cond(b: int, seed: int = 0) -> TextConditioning:
    g = torch.Generator().manual_seed(seed)
    return TextConditioning(torch.randn(b, 4, 16, generator=g), torch.ones(b, 4, dtype=torch.long),
                            torch.randn(b, 8, generator=g))


def test_loss_is_the_flow_matching_objective_through_the_raw_transformer() -> None:
    toy = ToyConfig(**SMALL)
    transformer = new_transformer(toy, 12, seed=0)
    policy = HunyuanVideoPolicy(transformer, PixelUnshuffleCodec(2), embedded_guidance=6018.0)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 12, 3, 4, 4, generator=g), torch.randn(3, 12, 3, 4, 4, generator=g)
    sigma, cond = torch.tensor([0.9, 0.5357, 0.1]), _cond(3)
    got = flow_matching_loss(policy, x0, sigma, cond, noise)
    x_sigma = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise
    with torch.no_grad():
        v = transformer(hidden_states=x_sigma, timestep=torch.tensor([int(float(x) * 1000) for x in sigma]),
                        encoder_hidden_states=cond.prompt_embeds, encoder_attention_mask=cond.attention_mask,
                        pooled_projections=cond.pooled, guidance=torch.full((3,), 6018.0), return_dict=False)[0]
    assert torch.isclose(got, ((v - (noise - x0)) ** 2).mean(), rtol=1e-5)


def test_logit_normal_sigmas_are_shifted_like_the_sampler() -> None:
    g = torch.Generator().manual_seed(0)
    s = sample_sigma(20000, "logit_normal", 3.0, 16, g, "cpu")
    assert 0 < s.min() and s.max() <= 1
    assert math.isclose(float(s.median()), 3.0 / 4.0, abs_tol=0.01)  # median u = 1/2 -> s/(s+1)
    sched = sample_sigma(500, "schedule", 3.0, 16, g, "cpu")
    allowed = sigma_schedule(16, 3.0)[:-1]
    assert all(bool((allowed == x).any()) for x in sched) and len(set(sched.tolist())) == 16


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100) == pytest.approx(0.1)


def test_a_few_steps_lower_the_loss_on_held_out_videos() -> None:
    toy = ToyConfig(**SMALL)
    world, codec = ShapesWorld(toy), PixelUnshuffleCodec(2, shift=-0.9, scale=2.5)
    policy = HunyuanVideoPolicy(new_transformer(toy, 12, seed=0), codec)
    table = _cond(len(world.prompts), seed=5)
    g = torch.Generator().manual_seed(0)
    videos, idx = world.batch(32, torch.Generator().manual_seed(99))
    held = (codec.encode(videos), torch.rand(32, generator=g).clamp(0.05, 0.95), table.index(idx), torch.randn(32, 12, 3, 4, 4, generator=g))

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(flow_matching_loss(policy, *held))

    before = held_out_loss()
    opt = torch.optim.AdamW(policy.transformer.parameters(), lr=3e-3)
    for _ in range(40):
        v, i = world.batch(16, g)
        loss = flow_matching_loss(policy, codec.encode(v), torch.rand(16, generator=g), table.index(i),
                                  torch.randn(16, 12, 3, 4, 4, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_out_loss() < 0.7 * before


@pytest.mark.slow
def test_base_policy_scores_between_random_init_and_real_videos() -> None:
    """The committed base model on 8 prompts: ORM(real) > ORM(base) > ORM(random init), with clear gaps."""
    from euphonium_ray.toy.build import build_toy_model
    from euphonium_ray.toy.evaluate import calibrate

    import tempfile

    cfg = load_config("configs/toy.yaml", use_env=False)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_toy_model(f"{tmp}/model", cfg, log=lambda _: None)
        cal = calibrate(model, cfg, count=8, seed=0, batch=8)
    assert cal.real["score"] > cal.base["score"] + 0.15
    assert cal.base["score"] > cal.random_init["score"] + 0.3
