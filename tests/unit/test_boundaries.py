"""The lines the code must not cross (see README: layout)."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_distributed_imports_horovod():
    offenders = [
        str(p.relative_to(ROOT))
        for folder in ("hvdtrain", "models")
        for p in (ROOT / folder).rglob("*.py")
        if "horovod" in imports_of(p) and p.name != "distributed.py"
    ]
    assert offenders == []


def test_importing_hvdtrain_is_cheap():
    code = "import sys, hvdtrain, models; print('tensorflow' in sys.modules, 'horovod' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False"]
