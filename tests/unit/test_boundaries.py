"""The lines the code must not cross (see README: layout)."""
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The import graph, in layers: a module may import only modules of lower layers (so there is no cycle), and
# `exact_metrics` imports nothing above the distributed core. Every module of hvdtrain must be placed here.
LAYERS = {
    "errors": 0, "console": 0, "s3": 0.5, "storage": 1, "artifacts": 2, "batch_plan": 1, "schedule": 1, "memory": 1,
    "flops": 1, "distributed": 2, "config": 2, "data": 2, "rundir": 3, "exact_metrics": 3, "process": 3,
    "formats": 4, "parallel": 5, "callbacks": 6, "runtime": 6,
    "serving": 6.5, "train": 7, "compression": 7, "benchmark": 9, "evaluate": 8,
    "cli": 10, "__init__": 11,
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


def test_exact_metrics_is_a_leaf():
    used = hvdtrain_units(imports_of(ROOT / "hvdtrain" / "exact_metrics.py"))
    assert used <= {"distributed"}


def test_negative_control_the_layer_check_sees_an_upward_import(tmp_path):
    """The check above can fail: a low module importing a high one (a cycle in the making) is reported."""
    (tmp_path / "batch_plan.py").write_text("from hvdtrain import train\n")
    (tmp_path / "train.py").write_text("from hvdtrain import batch_plan\n")
    violations, _ = layer_violations(tmp_path)
    assert violations == ["batch_plan.py (batch_plan, layer 1) imports train (layer 7)"]


def test_importing_hvdtrain_is_cheap():
    """``import hvdtrain`` (the CLI's first step) loads neither TensorFlow nor Horovod; ``import models`` loads the
    families (TensorFlow), which registers their Keras layers for ``load_model``."""
    code = "import sys, hvdtrain; print('tensorflow' in sys.modules, 'horovod' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False"]


# the modules of models/ that name no family: what every family shares (its plan, the registry, the Hugging Face
# format, LoRA); their words may appear in the engines
GENERIC_MODULES = {"__init__.py", "plan.py", "registry.py", "hub.py", "lora.py"}


def model_words() -> set[str]:
    """Names that belong to a model family: the families, their classes, and their layers' and units' names."""
    import ast

    words = set()
    for path in (ROOT / "models").glob("*.py"):
        if path.name in GENERIC_MODULES:
            continue
        tree = ast.parse(path.read_text())
        words |= {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        words |= {n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "")
                  in ("register", "register_plan") and n.args and isinstance(n.args[0], ast.Constant)}
    return words | {"embed", "attn", "ln_final", "TransformerBlock"}  # unit and layer names of the families


def names_of_models_in(folder: Path) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        text = path.read_text()
        for word in model_words():
            if re.search(rf"\b{re.escape(word)}\b", text):
                found.append(f"{path.name}: {word}")
    return found


def test_the_engines_name_no_model():
    """``hvdtrain/distributed`` knows models only through their plans: no family, class, layer or unit name of
    any model appears there (code, comments or docs)."""
    assert {"gpt", "llama", "LlamaBlock", "TokenEmbedding"} <= model_words()
    assert names_of_models_in(ROOT / "hvdtrain" / "distributed") == []


def test_negative_control_a_model_name_in_an_engine_is_seen(tmp_path):
    (tmp_path / "engine.py").write_text("if layer.name.startswith('embed'):\n    pass\n")
    assert names_of_models_in(tmp_path) == ["engine.py: embed"]
