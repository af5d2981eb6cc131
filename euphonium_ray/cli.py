"""The ``euphonium-ray`` command: one entry point, subcommands resolved lazily so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

# subcommand -> (module:function taking argv list and returning an exit code, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("euphonium_ray.driver:main", "train with Euphonium on Ray (embedded local Ray unless cluster.address)"),
    "config": ("euphonium_ray.cli:config_main", "config show --config F [--set a.b=v]: print the resolved config"),
    "sde-demo": ("euphonium_ray.sde_demo:main", "2-D demo of reward-gradient-guided sampling (writes a PNG)"),
    "toy": ("euphonium_ray.toy.cli:main", "the synthetic shapes world: build, pretrain, samples"),
    "train-prm": ("euphonium_ray.prm_training:main", "train a latent process reward model on labelled rollouts"),
    "preprocess": ("euphonium_ray.preprocess:main", "encode a prompts file into upstream's embedding layout"),
    "generate": ("euphonium_ray.generate:main", "sample videos (ODE, SDE or RGG) from a model folder"),
    "dashboards": ("euphonium_ray.dashboards:main", "dashboards build|push: the Grafana dashboard of euphonium_* metrics"),
    "bench": ("euphonium_ray.bench.cli:main", "bench convergence: Euphonium vs DanceGRPO vs Flow-GRPO on the toy world"),
}


def _resolve(target: str) -> Callable[[list[str]], int]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def config_main(argv: list[str]) -> int:
    from euphonium_ray.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="euphonium-ray config")
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="print the resolved config as YAML")
    show.add_argument("--config", help="YAML config file")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    show.add_argument("--no-env", action="store_true", help="ignore upstream environment variables")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set, use_env=not args.no_env)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(cfg.to_yaml(), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print("usage: euphonium-ray COMMAND [ARGS]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<11} {text}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; try: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return int(_resolve(COMMANDS[name][0])(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
