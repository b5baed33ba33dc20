"""Package layering (docs/architecture.md): no import cycles, no import from a later stage into an earlier."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "hemexp"
# Lower never imports higher; same rank only within one package. hemexp/cli.py and hemexp/__init__.py: top.
RANK = {"core": 0, "io": 1, "tracking": 2, "engine": 2, "cohort": 3, "preprocess": 4, "vae": 5,
        "diffusion": 6, "sampling": 7, "baselines": 8, "evaluation": 9, "release": 10,
        "workflow": 11}
TOP = 99
STAGES = ("cohort", "preprocess", "vae", "diffusion", "sampling", "evaluation", "baselines", "release")


def sources() -> dict[str, tuple[str, bool]]:
    """module name -> (source, is_package) for every hemexp module."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path.read_text(), is_pkg)
    return out


def edges(mods: dict[str, tuple[str, bool]]) -> set[tuple[str, str]]:
    """(importer, imported) between hemexp modules, module- and function-level, relative imports resolved."""

    def known(name: str) -> str | None:  # longest hemexp module prefix of a dotted name (drops attributes)
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    out = set()
    for mod, (src, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                targets = [known(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = mod.split(".")[: len(mod.split(".")) + is_pkg - node.level] if node.level else []
                base = ".".join(base + ([node.module] if node.module else []))
                targets = [known(f"{base}.{a.name}") for a in node.names]
            else:
                continue
            out |= {(mod, t) for t in targets if t and t != mod}
    return out


def rank(mod: str) -> tuple[int, str]:
    parts = mod.split(".")
    if len(parts) == 1 or parts[1] == "cli":
        return TOP, ""
    return RANK.get(parts[1], -1), parts[1]  # -1: a subpackage without a layer fails every edge


def offending(es: set[tuple[str, str]]) -> list[str]:
    """Every backwards or cross-package same-rank edge, and every edge on an import cycle."""
    graph: dict[str, set[str]] = {}
    for a, b in es:
        graph.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo += graph.get(node, ())
        return False

    bad = []
    for a, b in sorted(es):
        (ra, pa), (rb, pb) = rank(a), rank(b)
        layer = ra < rb or ra < 0 or (ra == rb and pa != pb)
        why = [w for w, hit in (("layer", layer), ("cycle", reaches(b, a))) if hit]
        if why:
            bad.append(f"{a} -> {b} (rank {ra} -> {rb}; {', '.join(why)})")
    return bad


def test_layering_and_no_cycles():
    bad = offending(edges(sources()))
    assert not bad, f"{len(bad)} offending import edge(s):\n" + "\n".join(bad)


EMPTY = ("", False)


@pytest.mark.parametrize("mods, expected", [
    ({"hemexp.core.config": ("from hemexp.vae import model\n", False), "hemexp.vae.model": EMPTY},
     ["hemexp.core.config -> hemexp.vae.model (rank 0 -> 5; layer)"]),
    ({"hemexp.io.nifti": ("from ..preprocess.grid import Grid\n", False), "hemexp.preprocess.grid": EMPTY},
     ["hemexp.io.nifti -> hemexp.preprocess.grid (rank 1 -> 4; layer)"]),
    ({"hemexp.engine.trainer": ("def f():\n    import hemexp.tracking.runs\n", False),
      "hemexp.tracking.runs": EMPTY},
     ["hemexp.engine.trainer -> hemexp.tracking.runs (rank 2 -> 2; layer)"]),
    ({"hemexp.vae": ("from .model import X\n", True),
      "hemexp.vae.model": ("def f():\n    from . import X\n", False)},
     ["hemexp.vae -> hemexp.vae.model (rank 5 -> 5; cycle)",
      "hemexp.vae.model -> hemexp.vae (rank 5 -> 5; cycle)"]),
    ({"hemexp.cli": ("from hemexp.workflow import cli\n", False), "hemexp.workflow.cli": EMPTY}, []),
])
def test_edge_finder_flags_synthetic_edges(mods, expected):
    assert offending(edges(mods)) == expected


def test_subpackages_have_docstrings_and_stage_clis():
    bad = []
    for pkg in sorted(p for p in PKG.rglob("*") if p.is_dir() and p.name != "__pycache__"):
        init = pkg / "__init__.py"
        if not (init.exists() and ast.get_docstring(ast.parse(init.read_text()))):
            bad.append(f"{init.relative_to(ROOT)}: missing or without a docstring")
        if pkg.parent == PKG and pkg.name not in RANK:
            bad.append(f"hemexp/{pkg.name}: not in RANK (give it a layer)")
    bad += [f"rules/{s}.smk without hemexp/{s}/cli.py" for s in STAGES
            if not ((ROOT / "rules" / f"{s}.smk").exists() and (PKG / s / "cli.py").exists())]
    assert not bad, "\n".join(bad)


def test_the_workflow_files_import_no_deep_learning_stack():
    """Every Snakemake invocation parses the Snakefile (on a cluster, every job does), so the hemexp
    modules it and the rule files import must not pull in torch, MONAI, Lightning or pyplot: that
    would add seconds to each of thousands of per-patient jobs."""
    import re
    import subprocess
    import sys

    files = [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))]
    imports = sorted({m for f in files for m in re.findall(r"^\s*from (hemexp[\w.]*) import", f.read_text(), re.M)})
    assert imports, "no hemexp imports found in the workflow files"
    heavy = ("torch", "monai", "lightning", "matplotlib.pyplot")
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in imports) + \
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "", f"the workflow files import {loaded.stdout.strip()} (via {imports})"
