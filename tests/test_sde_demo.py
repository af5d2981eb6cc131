"""The RGG demo runs end to end and guidance raises the reward on the toy world."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from euphonium_ray.sde_demo import GaussianMixture2D, main


def test_sde_demo_writes_png_and_guided_beats_unguided(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path), "--samples", "64", "--seed", "1"]) == 0
    png = tmp_path / "sde_demo.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    numbers = json.loads((tmp_path / "sde_demo.json").read_text())
    assert numbers["samples"] == 64
    assert numbers["guided_mean_reward"] > numbers["unguided_mean_reward"]
    assert numbers["guided_near_target"] > numbers["unguided_near_target"]


def test_mixture_velocity_is_the_conditional_expectation() -> None:
    # Monte Carlo check of the closed form: E[ε − x0 | x_σ] estimated by kernel regression at one point.
    world = GaussianMixture2D.ring(modes=4, radius=1.0, std=0.3)
    g = torch.Generator().manual_seed(0)
    n = 400_000
    x0 = world.means[torch.randint(0, 4, (n,), generator=g)] + world.std * torch.randn(n, 2, generator=g)
    eps = torch.randn(n, 2, generator=g)
    for sigma in (0.3, 0.9):
        xs = (1 - sigma) * x0 + sigma * eps
        for point in (torch.tensor([[0.3, -0.2]]), torch.tensor([[0.8, 0.1]])):
            w = torch.exp(-((xs - point) ** 2).sum(1) / (2 * 0.05**2))
            mc = ((eps - x0) * w.unsqueeze(1)).sum(0) / w.sum()
            torch.testing.assert_close(world.velocity(point, sigma)[0], mc, rtol=0, atol=0.05)
