"""``euphonium-ray bench SUITE``: the benchmarks (today: ``convergence``, Euphonium vs DanceGRPO vs Flow-GRPO)."""

from __future__ import annotations

import sys

SUITES = {"convergence": "euphonium_ray.bench.convergence"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print("usage: euphonium-ray bench SUITE [ARGS]\n\nsuites:\n  convergence  does Euphonium learn faster than "
              "DanceGRPO and Flow-GRPO on the toy world, and by how much")
        return 0 if argv else 2
    suite, rest = argv[0], argv[1:]
    if suite not in SUITES:
        print(f"error: unknown benchmark {suite!r}; try: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    import importlib

    return int(importlib.import_module(SUITES[suite]).main(rest))
