"""The layering rules of docs/architecture.md, checked on the source: the core (the maths, the step, the models, the
toy world, the config) never imports Ray or the Ray glue, and the models never import the toy world. A violation
fails with the file, the line and the import."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "euphonium_ray"
# The Ray glue: the actors (the top-level actors/ folder, installed as euphonium_ray.actors) and the modules that
# drive them or talk to a Ray cluster. Everything else under euphonium_ray/ is the core.
GLUE = {"euphonium_ray.actors", "euphonium_ray.actor_failure", "euphonium_ray.driver", "euphonium_ray.metrics",
        "euphonium_ray.ray_output", "euphonium_ray.bench.ray_runs", "euphonium_ray.cli",
        "euphonium_ray.fault_injection"}
# The two doors from a core command into the glue, each a lazy import taken only when the user asks for Ray
# (docs/architecture.md): ``preprocess --ray-workers`` and ``bench convergence --ray``.
DOORS = {("euphonium_ray/preprocess.py", "euphonium_ray.actors.prompt_encoders"),
         ("euphonium_ray/bench/convergence.py", "euphonium_ray.bench.ray_runs")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, at the top or inside a function, as (line, dotted name)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def _within(name: str, prefixes: set[str] | tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(files: list[Path], banned: tuple[str, ...]) -> list[str]:
    return [f"{f.relative_to(ROOT)}:{line} imports {name}" for f in files for line, name in _imports(f)
            if _within(name, banned) and not any(str(f.relative_to(ROOT)) == path and _within(name, (door,))
                                                 for path, door in DOORS)]


def core_files() -> list[Path]:
    return [f for f in sorted(PACKAGE.rglob("*.py")) if not _within(_module_name(f), GLUE)]


def test_the_core_never_imports_ray_or_the_ray_glue():
    files = core_files()
    assert len(files) > 30 and PACKAGE / "step.py" in files and PACKAGE / "learner.py" in files
    assert _violations(files, ("ray", *sorted(GLUE))) == []


def test_the_models_never_import_the_toy_world():
    assert _violations(sorted((PACKAGE / "models").rglob("*.py")), ("euphonium_ray.toy",)) == []


def test_the_layering_check_sees_an_import_inside_a_function(tmp_path):
    """The checker itself: a lazy ``import ray`` and a ``from euphonium_ray.toy ...`` are both reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import ray.train\n    from euphonium_ray.toy.world import ShapesWorld\n")
    assert [name for _, name in _imports(bad)] == ["ray.train", "euphonium_ray.toy.world",
                                                    "euphonium_ray.toy.world.ShapesWorld"]
    assert len([n for _, n in _imports(bad) if _within(n, ("ray",))]) == 1
