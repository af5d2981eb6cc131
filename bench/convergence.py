#!/usr/bin/env python
"""Thin script for the convergence benchmark; the logic is ``euphonium_ray.bench.convergence`` (installed with
the package). Same flags as ``euphonium-ray bench convergence``, e.g. ``python bench/convergence.py --quick``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from euphonium_ray.bench.convergence import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
