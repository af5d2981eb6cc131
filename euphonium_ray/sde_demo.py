"""A visible demo of reward-gradient-guided sampling (RGG) on a 2-D toy world with exact maths.

Data is a mixture of isotropic Gaussians in 2-D. Under rectified flow its velocity ``v(x, σ) = E[ε − x0 | x_σ]``
is known in closed form, so it stands in for a perfectly trained network. The "PRM" scores a noisy point by
the reward of its predicted clean point, ``r(x, σ) = R(x̂0(x, σ))`` with ``R(x0) = −‖x0 − target‖²``, and its
gradient comes from autograd through the velocity field, as a latent PRM's would. Both samplers use the
library's :func:`euphonium_ray.sde.sde_step` and :func:`euphonium_ray.sde.guidance_shift` with the same initial
noise and the same step noise, so the only difference is the guidance.

The guidance scale here (default 1.0) is 100× upstream's 0.01: upstream's gradients come from a reward model
on ~10^5-dim latents, while this toy's reward is O(1) in 2 dims; at 0.01 the effect would be invisible.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from euphonium_ray.sde import (
    NoiseType,
    flow_sigma_1,
    guidance_shift,
    in_window,
    predicted_x0,
    sde_step,
    sigma_schedule,
)

__all__ = ["GaussianMixture2D", "DemoResult", "run_demo", "main"]


@dataclass
class GaussianMixture2D:
    """Equal-weight mixture of N(m_k, s²I) whose rectified-flow velocity field is analytic."""

    means: Tensor  # (K, 2)
    std: float

    @classmethod
    def ring(cls, modes: int = 8, radius: float = 2.0, std: float = 0.15) -> "GaussianMixture2D":
        angles = torch.arange(modes, dtype=torch.float32) * (2 * math.pi / modes)
        return cls(torch.stack([radius * torch.cos(angles), radius * torch.sin(angles)], dim=1), std)

    def velocity(self, x: Tensor, sigma: float) -> Tensor:
        """``E[ε − x0 | x_σ = x]`` for ``x_σ = (1−σ)x0 + σε``.

        Per component k: x_σ ~ N(a·m_k, V_k I) with a = 1−σ, V_k = a²s² + σ², and
        ``E[ε − x0 | x, k] = (σ − a·s²)(x − a·m_k)/V_k − m_k``; mixed by the posterior weights p(k | x).
        """
        a = 1.0 - sigma
        var = a**2 * self.std**2 + sigma**2
        centred = x.unsqueeze(1) - a * self.means.unsqueeze(0)  # (B, K, 2)
        log_w = -(centred**2).sum(-1) / (2 * var)  # equal weights and variances: the constants cancel
        w = torch.softmax(log_w, dim=1).unsqueeze(-1)
        v_k = (sigma - a * self.std**2) * centred / var - self.means.unsqueeze(0)
        return (w * v_k).sum(1)


def outcome_reward(x0: Tensor, target: Tensor) -> Tensor:
    """R(x0) = −‖x0 − target‖², per sample."""
    return -((x0 - target) ** 2).sum(-1)


@dataclass
class DemoResult:
    samples: int
    seed: int
    steps: int
    shift: float
    noise_type: str
    eta: float
    guidance_scale: float
    guidance_start: int
    target: list[float]
    unguided_mean_reward: float
    guided_mean_reward: float
    unguided_near_target: float
    guided_near_target: float


def _sample(
    world: GaussianMixture2D,
    target: Tensor,
    noise: list[Tensor],
    x_init: Tensor,
    schedule: Tensor,
    *,
    noise_type: NoiseType,
    eta: float,
    scale: float,
    start: int,
) -> Tensor:
    """Run the sampler from ``x_init`` with the given per-step noise; guidance on steps in the window."""
    x = x_init
    n = schedule.numel() - 1
    s1 = flow_sigma_1(schedule)
    for i in range(n):
        sigma, sigma_next = float(schedule[i]), float(schedule[i + 1])
        shift = None
        if scale != 0.0 and in_window(i, start, None, 1, n):
            x_req = x.detach().requires_grad_(True)
            reward = outcome_reward(predicted_x0(x_req, world.velocity(x_req, sigma), sigma), target)
            (grad,) = torch.autograd.grad(reward.sum(), x_req)
            shift = guidance_shift(grad, scale, sigma - sigma_next, delta_t_scaling=True, normalize=False)
        with torch.no_grad():
            out = sde_step(x, world.velocity(x, sigma), sigma, sigma_next, noise_type=noise_type, eta=eta,
                           sigma_1=s1, guidance=shift, noise=noise[i])
        x = out.x_next
    return x


def run_demo(
    samples: int = 512,
    seed: int = 0,
    steps: int = 16,
    shift: float = 3.0,
    noise_type: NoiseType = "dance",
    eta: float = 0.5,
    scale: float = 1.0,
    start: int = 0,
) -> tuple[DemoResult, Tensor, Tensor, GaussianMixture2D, Tensor]:
    """Sample with and without RGG from the same noise; return the numbers and both point clouds."""
    world = GaussianMixture2D.ring()
    target = torch.tensor([2.0, 0.0])
    gen = torch.Generator().manual_seed(seed)
    x_init = torch.randn(samples, 2, generator=gen)
    noise = [torch.randn(samples, 2, generator=gen) for _ in range(steps)]
    schedule = sigma_schedule(steps, shift)
    plain = _sample(world, target, noise, x_init, schedule, noise_type=noise_type, eta=eta, scale=0.0, start=start)
    guided = _sample(world, target, noise, x_init, schedule, noise_type=noise_type, eta=eta, scale=scale, start=start)

    def near(x: Tensor) -> float:  # share of samples that landed in the target's mode
        return float(((x - target).norm(dim=-1) < 4 * world.std).float().mean())

    result = DemoResult(
        samples=samples, seed=seed, steps=steps, shift=shift, noise_type=noise_type, eta=eta,
        guidance_scale=scale, guidance_start=start, target=target.tolist(),
        unguided_mean_reward=float(outcome_reward(plain, target).mean()),
        guided_mean_reward=float(outcome_reward(guided, target).mean()),
        unguided_near_target=near(plain), guided_near_target=near(guided),
    )
    return result, plain, guided, world, target


def _plot(path: Path, result: DemoResult, plain: Tensor, guided: Tensor, world: GaussianMixture2D,
          target: Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 5), sharex=True, sharey=True)
    panels = [("unguided SDE", plain, result.unguided_mean_reward, "tab:blue"),
              (f"RGG, scale {result.guidance_scale:g}", guided, result.guided_mean_reward, "tab:orange")]
    for ax, (name, pts, reward, colour) in zip(axes, panels):
        ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=6, alpha=0.6, color=colour)
        ax.scatter(world.means[:, 0].numpy(), world.means[:, 1].numpy(), marker="x", color="black", s=40)
        ax.scatter([float(target[0])], [float(target[1])], marker="*", color="red", s=200, label="reward target")
        ax.set_title(f"{name}\nmean reward {reward:.3f}")
        ax.set_aspect("equal")
        ax.legend(loc="lower left", fontsize=8)
    fig.suptitle(f"{result.samples} samples, {result.steps} steps, noise {result.noise_type} "
                 f"(η={result.eta:g}), same seed {result.seed}")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``euphonium-ray sde-demo``: write ``sde_demo.png`` and ``sde_demo.json`` under ``--out``."""
    parser = argparse.ArgumentParser(prog="euphonium-ray sde-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/sde-demo"), help="output directory")
    parser.add_argument("--samples", type=int, default=512, help="points per sampler")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--shift", type=float, default=3.0)
    parser.add_argument("--noise-type", choices=["dance", "flow"], default="dance")
    parser.add_argument("--eta", type=float, default=0.5, help="η for dance noise")
    parser.add_argument("--scale", type=float, default=1.0, help="guidance scale c (upstream 0.01; see module doc)")
    parser.add_argument("--start", type=int, default=0, help="first guided step")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error("--samples must be >= 1")
    result, plain, guided, world, target = run_demo(
        samples=args.samples, seed=args.seed, steps=args.steps, shift=args.shift, noise_type=args.noise_type,
        eta=args.eta, scale=args.scale, start=args.start,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    _plot(args.out / "sde_demo.png", result, plain, guided, world, target)
    (args.out / "sde_demo.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    print(f"unguided mean reward {result.unguided_mean_reward:.4f} "
          f"({100 * result.unguided_near_target:.1f}% in the target mode)")
    print(f"guided   mean reward {result.guided_mean_reward:.4f} "
          f"({100 * result.guided_near_target:.1f}% in the target mode), scale {result.guidance_scale:g}")
    print(f"wrote {args.out / 'sde_demo.png'} and {args.out / 'sde_demo.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
