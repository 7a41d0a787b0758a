"""The README's public-API example, exactly as written, at 2 ranks."""
import re
import sys

import pytest

from tests.helpers import ROOT, horovodrun

pytestmark = pytest.mark.e2e


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- readme-example:start -->\s*```python\n(.*?)```", text, re.S)
    assert block, "the README lost its example block"
    return block.group(1)


def test_readme_example_runs_at_two_ranks(tmp_path):
    script = tmp_path / "my_script.py"
    script.write_text(readme_example())
    proc = horovodrun([sys.executable, script], extra=["--gloo"], timeout=600, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(re.findall(r"rank (\d) of 2: loss ([0-9.]+)", proc.stdout))
    assert set(lines) == {"0", "1"}  # both ranks ran the script to the end
    assert lines["0"] == lines["1"]  # and logged the same, averaged loss
    assert float(lines["0"]) < 0.5
    rows = (tmp_path / "runs" / "my-script" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 5
