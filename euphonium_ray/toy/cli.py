"""``euphonium-ray toy``: build the toy model folder, pretrain its policy, look at and score its samples."""

from __future__ import annotations

import argparse
import json
import sys
import importlib.util
from pathlib import Path

from euphonium_ray.config import ConfigError, RunConfig, load_config



def _configs_folder() -> Path:
    """``configs/``: the checkout's top-level folder, or the wheel's ``euphonium_ray/configs``."""
    spec = importlib.util.find_spec("euphonium_ray.configs")
    assert spec is not None and spec.submodule_search_locations, "euphonium_ray.configs is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


DEFAULT_CONFIG = _configs_folder() / "toy.yaml"


def _config(args: argparse.Namespace) -> RunConfig:
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    return load_config(path, args.set, use_env=False)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML (default: configs/toy.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="euphonium-ray toy", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="model folder + prompt embeddings (copies the committed pretrained policy)")
    b.add_argument("dir")
    b.add_argument("--retrain", action="store_true", help="pretrain a new transformer instead of copying the committed one")
    b.add_argument("--update-assets", action="store_true", help="copy the result into euphonium_ray/toy/assets")
    p = sub.add_parser("pretrain", help="pretrain the policy of a built folder (writes DIR/transformer)")
    p.add_argument("dir")
    for q in (b, p):
        _common(q)
        q.add_argument("--steps", type=int, default=None, help="override toy.pretrain_steps")
        q.add_argument("--batch", type=int, default=None, help="override toy.pretrain_batch")
        q.add_argument("--save-every", type=int, default=0, help="also keep checkpoints every N steps")
    s = sub.add_parser("samples", help="PNG grid + GIF of base samples (and guided ones with --prm)")
    s.add_argument("dir")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--count", type=int, default=12)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--noise-type", choices=["ode", "dance", "flow"], default="ode")
    s.add_argument("--prm", default=None, help="a latent PRM folder: also write RGG-guided samples")
    _common(s)
    e = sub.add_parser("eval", help="mean ORM of real videos, base samples and random-init samples")
    e.add_argument("dir")
    e.add_argument("--count", type=int, default=48)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", default=None, help="also write the numbers here")
    _common(e)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = _config(args)
        if args.action == "build":
            from euphonium_ray.toy.build import build_toy_model, export_assets

            out = build_toy_model(args.dir, cfg, retrain=args.retrain, device=args.device, steps=args.steps,
                                  batch=args.batch, save_every=args.save_every)
            if args.update_assets:
                print(f"assets: {export_assets(out)}")
            print(f"toy model folder: {out}")
        elif args.action == "pretrain":
            from euphonium_ray.toy.build import pretrain_into

            pretrain_into(Path(args.dir).resolve(), cfg, device=args.device, steps=args.steps, batch=args.batch,
                          save_every=args.save_every)
        elif args.action == "samples":
            from euphonium_ray.toy.samples import write_samples

            prm = None
            if args.prm:
                from euphonium_ray.prm_training import load_prm_folder

                prm = load_prm_folder(args.prm, cfg, args.device or "cpu")
            report = write_samples(args.dir, args.out, cfg, count=args.count, seed=args.seed,
                                   noise_type=args.noise_type, prm=prm, device=args.device or "cpu")
            for key, path in report.paths.items():
                print(f"{key}: {path}")
            print("mean ORM: " + ", ".join(f"{k} {v:.3f}" for k, v in report.orm.items()) + f" ({report.count} videos each)")
        elif args.action == "eval":
            from euphonium_ray.toy.evaluate import calibrate

            cal = calibrate(args.dir, cfg, count=args.count, seed=args.seed, device=args.device or "cpu")
            print(f"mean ORM over {cal.count} videos each (ODE, {cfg.sampler.num_steps} steps, shift {cfg.sampler.shift}):")
            print(cal.table())
            if args.json:
                Path(args.json).write_text(json.dumps(cal.__dict__, indent=2) + "\n")
    except (ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
