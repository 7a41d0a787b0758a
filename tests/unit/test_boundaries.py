"""The lines the code must not cross (see README: layout)."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The import graph, in layers: a module may import only modules of lower layers (so there is no cycle), and
# `evaluation` imports nothing above the distributed core. Every module of hvdtrain must be placed here.
LAYERS = {
    "errors": 0, "console": 0, "storage": 1, "artifacts": 2, "plan": 1, "schedule": 1, "memory": 1,
    "distributed": 2, "config": 2, "data": 2, "rundir": 3, "evaluation": 3,
    "checkpoint": 4, "parallel": 5, "modelfile": 5, "callbacks": 6, "runtime": 6, "modelio": 6,
    "decoding": 6, "train": 7, "compression": 7, "generate": 7, "benchmark": 8, "export": 8,
    "cli": 9, "__init__": 10,
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def hvdtrain_units(imports: set[str]) -> set[str]:
    out = set()
    for name in imports:
        parts = name.split(".")
        if parts[0] == "hvdtrain" and len(parts) > 1 and parts[1] in LAYERS:
            out.add(parts[1])
    return out


def test_only_the_distributed_package_imports_horovod():
    offenders = [
        str(p.relative_to(ROOT))
        for folder in ("hvdtrain", "models")
        for p in (ROOT / folder).rglob("*.py")
        if any(n.split(".")[0] == "horovod" for n in imports_of(p))
        and not p.relative_to(ROOT).as_posix().startswith("hvdtrain/distributed/")
    ]
    assert offenders == []


def test_models_import_nothing_of_hvdtrain():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "models").rglob("*.py")
                 if any(n.split(".")[0] == "hvdtrain" for n in imports_of(p))]
    assert offenders == []


def layer_violations(package: Path) -> tuple[list[str], set[str]]:
    """Imports of ``package`` (a copy of hvdtrain/) that go up or sideways a layer, and modules with no layer."""
    violations, unplaced = [], set()
    for path in package.rglob("*.py"):
        me = path.relative_to(package).with_suffix("").parts[0]
        if me not in LAYERS:
            unplaced.add(me)
            continue
        for other in hvdtrain_units(imports_of(path)) - {me}:
            if LAYERS[other] >= LAYERS[me]:
                violations.append(f"{path.name} ({me}, layer {LAYERS[me]}) imports {other} (layer {LAYERS[other]})")
    return violations, unplaced


def test_the_import_graph_is_layered_without_cycles():
    violations, unplaced = layer_violations(ROOT / "hvdtrain")
    assert not unplaced, f"modules with no layer in LAYERS: {sorted(unplaced)}"
    assert violations == []


def test_evaluation_is_a_leaf():
    used = hvdtrain_units(imports_of(ROOT / "hvdtrain" / "evaluation.py"))
    assert used <= {"distributed"}


def test_negative_control_the_layer_check_sees_an_upward_import(tmp_path):
    """The check above can fail: a low module importing a high one (a cycle in the making) is reported."""
    (tmp_path / "plan.py").write_text("from hvdtrain import train\n")
    (tmp_path / "train.py").write_text("from hvdtrain import plan\n")
    violations, _ = layer_violations(tmp_path)
    assert violations == ["plan.py (plan, layer 1) imports train (layer 7)"]


def test_importing_hvdtrain_is_cheap():
    code = "import sys, hvdtrain, models; print('tensorflow' in sys.modules, 'horovod' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False"]
