"""Does the latent PRM help? Held-out prediction quality and reward-gradient guidance (RGG) vs unguided sampling.

    .venv/bin/python bench/prm_guidance.py --model outputs/toy-model --prm euphonium_ray/toy/assets/prm \\
        --config configs/toy.yaml --videos 96 --scales 0,0.3,1,3,10 --out bench/results/prm_guidance.json

For every guidance scale c the same videos are sampled with the same seeds (same initial noise and the same SDE
noise draws), with the RGG shift ``c·Δt·∇r_PRM(x_i, σ_i)`` on the window of the config's ``rgg`` section, and
scored by the ORM. Scale 0 is unguided sampling. The table shows the mean ORM score, the paired difference to
unguided (mean ± standard error over videos, and the share of videos that improved), the ORM's terms when the ORM
reports them, and the PRM's own score of the final x̂0 (if that rises while the ORM does not, guidance is gaming
the PRM). The PRM's held-out correlations from its ``metrics.json`` are printed first.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from euphonium_ray.config import ConfigError, RunConfig, SPSAConfig, load_config
from euphonium_ray.models.base import ProcessRewardModel, TextConditioning
from euphonium_ray.prm_training import METRICS_NAME, load_orm, load_prm_folder, video_shape, with_model_toy_config
from euphonium_ray.sampling import make_generators, sample_seed, sample_trajectories


def guided_outcomes(policy, prm: ProcessRewardModel, orm, cond: TextConditioning, captions: list[str], cfg: RunConfig,
                    latent_shape: tuple[int, ...], scale: float, seeds: list[int], chunk: int, start: int,
                    normalize: bool) -> dict[str, torch.Tensor]:
    """ORM score (and its terms), PRM score of the final x̂0 and the mean PRM-gradient norm in the window, per
    video, for one guidance setting."""
    rgg = cfg.rgg.model_copy(update={"enabled": scale > 0, "scale": scale, "scale_mode": "fixed", "start": start,
                                     "normalize": normalize})
    out: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(captions), chunk):
        sl = slice(start, start + chunk)
        traj = sample_trajectories(
            policy, cond.index(sl), sampler=cfg.sampler, rgg=rgg, spsa=SPSAConfig(enabled=False),
            prm=prm if scale > 0 else None, latent_shape=latent_shape, group_size=1,
            generator=make_generators(seeds[sl]), same_initial_noise=False,
        )
        videos = policy.codec.decode(traj.x0_hat_final)
        terms = orm.score_terms(videos, captions[sl]).as_dict() if hasattr(orm, "score_terms") else \
            {"score": orm.score(videos, captions[sl])}
        terms["prm_x0"] = prm.score(traj.x0_hat_final, torch.zeros(len(videos)), cond.index(sl))
        on = traj.process_evaluated.float()
        terms["grad_norm"] = (traj.guidance_norms * on).sum(1) / on.sum(1).clamp(min=1)
        for name, value in terms.items():
            out.setdefault(name, []).append(value.float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def paired(diff: torch.Tensor) -> dict[str, float]:
    n = len(diff)
    se = float(diff.std() / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(diff.mean()), "stderr": se, "improved_share": float((diff > 1e-6).float().mean()),
            "worse_share": float((diff < -1e-6).float().mean())}


def _row(res: dict[str, torch.Tensor], base: dict[str, torch.Tensor], c: float, start: int | None,
         normalize: bool | None, seconds: float) -> dict[str, Any]:
    return {"scale": c, "start": start, "normalize": normalize, "videos": len(res["score"]),
            "seconds": round(seconds, 1), **{f"mean_{k}": round(float(v.mean()), 4) for k, v in res.items()},
            "vs_unguided": {k: round(v, 4) for k, v in paired(res["score"] - base["score"]).items()}}


def _name(row: dict[str, Any]) -> str:
    if row["scale"] == 0:
        return "unguided"
    return f"c={row['scale']:g} from step {row['start']}{' normalized' if row['normalize'] else ''}"


def _print(row: dict[str, Any], res: dict[str, torch.Tensor]) -> None:
    d = row["vs_unguided"]
    terms = "  ".join(f"{k} {float(v.mean()):.3f}" for k, v in res.items() if k not in ("score", "prm_x0", "grad_norm"))
    print(f"  {_name(row):<34} ORM {row['mean_score']:.4f}  Δ {d['mean']:+.4f} ± {d['stderr']:.4f}  improved "
          f"{d['improved_share']:.0%}  PRM(x̂0) {row['mean_prm_x0']:+.3f}  |∇| {row['mean_grad_norm']:.3g}  [{terms}]")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--prm", required=True, help="PRM folder (config.json + model.safetensors [+ metrics.json])")
    p.add_argument("--prompts", help="videos2caption.json (default: MODEL/embeddings/videos2caption.json)")
    p.add_argument("--orm", default="toy")
    p.add_argument("--videos", type=int, default=96, help="videos per scale (cycling through the prompts)")
    p.add_argument("--scales", default="0,0.3,1,3,10", help="comma-separated guidance scales c (0 = unguided)")
    p.add_argument("--starts", help="comma-separated first guided steps (default: rgg.start of the config)")
    p.add_argument("--normalize", choices=("false", "true", "both"), default="false",
                   help="per-sample unit-norm gradient (rgg.normalize) in the sweep")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--chunk", type=int, default=48, help="videos sampled together")
    p.add_argument("--out", help="JSON file for the results")
    p.add_argument("--device", default="cpu")
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from euphonium_ray.data import PromptEmbeddingDataset, pooled_dim_of
    from euphonium_ray.registry import POLICIES

    torch.set_grad_enabled(False)
    cfg = with_model_toy_config(cfg, args.model) if args.orm == "toy" else cfg
    policy = POLICIES.get(cfg.model.family).from_pretrained(args.model, trainable="none", device=args.device,
                                                            embedded_guidance=cfg.model.embedded_guidance)
    prm = load_prm_folder(args.prm, cfg, args.device)
    orm = load_orm(args.orm, cfg, args.device)
    index = args.prompts or str(Path(args.model) / "embeddings" / "videos2caption.json")
    dataset = PromptEmbeddingDataset(index, pooled_dim=pooled_dim_of(args.model))
    rows = [i % len(dataset) for i in range(args.videos)]
    cond, captions = dataset.conditioning(rows)
    cond = cond.to(args.device, torch.float32)
    seeds = [sample_seed(args.seed, 0, r, i // len(dataset)) for i, r in enumerate(rows)]
    latent_shape = tuple(policy.codec.latent_shape(*video_shape(args.orm, cfg)))
    scales = sorted({float(s) for s in args.scales.split(",")} | {0.0})

    prm_metrics = Path(args.prm) / METRICS_NAME
    heldout = json.loads(prm_metrics.read_text())["heldout"] if prm_metrics.is_file() else None
    if heldout:
        print("PRM held-out correlation with the ORM score (Pearson / within-group Pearson, n):")
        for b in heldout["by_sigma_bucket"]:
            lo, hi = b["sigma_range"]
            name = "σ = 0 (x̂0)" if hi == 0 else f"{lo:.1f} < σ ≤ {hi:.1f}"
            print(f"  {name:<16} {b['pearson']:+.3f} / {b.get('within_group_pearson', float('nan')):+.3f}  n={b['n']}")
        low = heldout["sigma_le_0.6"]
        print(f"  0 < σ ≤ 0.6      {low.get('pearson', float('nan')):+.3f}  (target > 0.5), n={low['n']}")

    starts = sorted({int(x) for x in args.starts.split(",")}) if args.starts else [cfg.rgg.start]
    norms = {"false": [False], "true": [True], "both": [False, True]}[args.normalize]
    print(f"\nRGG on {args.videos} videos per setting, same seeds; sampler {cfg.sampler.noise_type} η={cfg.sampler.eta} "
          f"{cfg.sampler.num_steps} steps shift {cfg.sampler.shift}; window start..{cfg.sampler.num_steps - 1}, "
          f"Δt scaling {cfg.rgg.delta_t_scaling}")
    t0 = time.perf_counter()
    base = guided_outcomes(policy, prm, orm, cond, captions, cfg, latent_shape, 0.0, seeds, args.chunk, 0, False)
    rows_out: list[dict[str, Any]] = [_row(base, base, 0.0, None, None, time.perf_counter() - t0)]
    _print(rows_out[0], base)
    for normalize in norms:
        for start in starts:
            for c in [x for x in scales if x > 0]:
                t0 = time.perf_counter()
                res = guided_outcomes(policy, prm, orm, cond, captions, cfg, latent_shape, c, seeds, args.chunk,
                                      start, normalize)
                rows_out.append(_row(res, base, c, start, normalize, time.perf_counter() - t0))
                _print(rows_out[-1], res)
    best = max(rows_out, key=lambda r: r["mean_score"])
    print(f"\nunguided ORM {rows_out[0]['mean_score']:.4f} vs best guided ({_name(best)}) {best['mean_score']:.4f} "
          f"(Δ {best['vs_unguided']['mean']:+.4f} ± {best['vs_unguided']['stderr']:.4f}) on {args.videos} videos each")
    if args.out:
        payload = {"model": args.model, "prm": args.prm, "videos": args.videos, "seed": args.seed,
                   "sampler": cfg.sampler.model_dump(), "rgg": cfg.rgg.model_dump(), "prm_heldout": heldout,
                   "settings": rows_out, "best": best}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
