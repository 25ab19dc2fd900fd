"""The import graph of scripts/moebench, read with ast (nothing is imported, lazy imports inside functions count):
a stage imports shared modules only, never another stage; a shared module never imports a stage; an arm never
imports another arm. Every module must be named below as shared or as a stage, so a new module is classified by
whoever adds it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "scripts" / "moebench"

# Shared modules: what stages build on. A package (arms, report) counts with all its modules.
SHARED = {
    "io", "metrics", "config",
    "harness",             # process context, time limit and heartbeat, skipped/failed/degraded rows
    "measure", "energy", "inspect", "routing",
    "verdict", "gates",    # the verdict and the pure training gates
    "arms",                # registry + base; arm modules are checked by ARM_COMMON below
    "report",              # figures, tables, pages (claims shares its table/CSS code)
    "ids",                 # provenance ids: one function for every id (name reserved for that module)
    "grid",                # how a row names its shape (sweep writes, recipe reads)
    "shapes",              # a models.yaml entry as its transformers config (model build, FLOP table)
    "router_calibration",  # the models stage's router fit, kept apart so it is unit-tested
    "workflowlib",         # helpers the Snakefile calls at parse time
    "chain",               # provenance hash chain and OpenTimestamps proofs (provenance, stamp, audit, report)
    "corpus",              # the synthetic conversations: data renders them, models trains its tokenizer on them
    "expert_offload",      # ExpertOffloader: the offload stage measures it, a recipe snippet hands it to users
    "sft", "adapters",     # the fine-tune's plumbing and the adapter round trip (validate's run builds on them)
    "probe",               # one fresh bench process at another shape (the sweeps and the shape curve use it)
}
# Stages: each one rule's `python -m moebench.<stage>` (or a command-line tool such as unlock).
STAGES = {
    "detect", "data", "models", "bench", "sweep", "offload", "validate", "finetune", "aggregate", "recipe",
    "claims", "provenance", "stamp", "audit", "plots", "unlock", "inputs", "quantcheck", "interleave",
    "routing_ab", "shape_curve",
}
ARM_COMMON = {"arms", "arms.base", "arms.unsloth_runtime"}  # what every arm may import; arms.<x> never imports arms.<y>


def module_name(path: Path, pkg: Path) -> str:
    """`bench`, `arms.hf`, `report` (for report/__init__.py), relative to the package."""
    parts = list(path.relative_to(pkg).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str, pkg: Path) -> bool:
    p = pkg.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imports_of(path: Path, pkg: Path) -> list[tuple[str, int]]:
    """Every module of the package that `path` imports (relative or `moebench.` absolute), with its line."""
    me = module_name(path, pkg)
    here = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]  # the importer's package
    here = [p for p in here if p]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name.split(".", 1)[1], node.lineno) for a in node.names if a.name.startswith(pkg.name + ".")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module + ".").startswith(pkg.name + "."):
                target = node.module[len(pkg.name) + 1:]
            else:
                continue
            for a in node.names:  # `from . import bench` and `from .arms import hf` name modules too
                sub = f"{target}.{a.name}" if target else a.name
                found.append((sub if is_module(sub, pkg) else target, node.lineno))
    return [(t, line) for t, line in found if t and t != me]


def kind(mod: str) -> str | None:
    top = mod.split(".")[0]
    if top == "arms":
        return "shared" if mod in ARM_COMMON else "arm"
    return "shared" if top in SHARED else "stage" if top in STAGES else None


def graph(pkg: Path = PKG) -> dict[tuple[str, str], str]:
    """(importer, imported) -> 'file:line' for every import between the package's modules."""
    edges = {}
    for path in sorted(pkg.rglob("*.py")):
        me = module_name(path, pkg)
        for target, line in imports_of(path, pkg):
            edges.setdefault((me, target), f"{path.relative_to(pkg.parent)}:{line}")
    return edges


def violations(pkg: Path = PKG) -> dict[tuple[str, str], str]:
    """Edges breaking a rule -> 'file:line: why'. Edges are named by top module (by module inside arms/)."""
    bad = {}
    for (src, dst), where in graph(pkg).items():
        ks, kd = kind(src), kind(dst)
        top_s, top_d = src.split(".")[0], dst.split(".")[0]
        if ks == "stage" and kd == "stage" and top_s != top_d:
            bad[(top_s, top_d)] = f"{where}: stage {top_s} imports stage {top_d}"
        elif ks in ("shared", "arm") and kd == "stage":
            bad[(src if ks == "arm" else top_s, top_d)] = f"{where}: shared module {src} imports stage {top_d}"
        elif ks == "arm" and kd == "arm":
            bad[(src, dst)] = f"{where}: arm {src} imports arm {dst}"
    return bad


def test_every_module_is_named_shared_or_stage():
    unknown = sorted({m for m in map(lambda p: module_name(p, PKG), PKG.rglob("*.py")) if m and kind(m) is None})
    assert not unknown, f"add each to SHARED or STAGES in tests/test_imports.py: {unknown}"
    assert not SHARED & STAGES, SHARED & STAGES


def test_stages_import_shared_modules_only_and_arms_not_each_other():
    """No exceptions: the last pending edge (models -> data) went when the corpus moved to a shared module."""
    bad = violations()
    assert not bad, "import edges against the module rules (move the shared code into a shared module):\n" + \
        "\n".join(sorted(bad.values()))


@pytest.fixture
def toy(tmp_path):
    """A small package with one edge of each kind the rules forbid, and allowed ones beside them."""
    pkg = tmp_path / "moebench"
    files = {
        "__init__.py": "",
        "io.py": "import json\n",
        "harness.py": "from .io import x\n\ndef f():\n    from . import bench  # lazy, still an edge\n",
        "bench.py": "from . import io, harness\nfrom .arms import hf\n",
        "offload.py": "from moebench.bench import watched\n",  # absolute form
        "detect.py": "import moebench.validate\n",
        "validate.py": "from .gates import judge\n",
        "arms/__init__.py": "from .base import Arm\n",
        "arms/base.py": "",
        "arms/hf.py": "from .base import Arm\nfrom ..io import y\n",
        "arms/e4b.py": "from .unsloth import census\n",
        "arms/unsloth.py": "from . import base\n",
        "report/__init__.py": "", "report/pages.py": "from .tables import css\nfrom ..plots import draw\n",
        "report/tables.py": "",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    return pkg


def test_checker_finds_each_kind_of_bad_edge(toy):
    assert set(violations(toy)) == {("harness", "bench"), ("offload", "bench"), ("detect", "validate"),
                                    ("arms.e4b", "arms.unsloth"), ("report", "plots")}
    g = graph(toy)
    assert {("bench", "io"), ("bench", "arms.hf"), ("arms.hf", "io"), ("report.pages", "report.tables"),
            ("arms.unsloth", "arms.base")} <= set(g)
    assert g[("harness", "bench")] == "moebench/harness.py:4"
