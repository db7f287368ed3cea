"""The README's Python example runs and prints what its comments say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_example_prints_what_it_claims(tmp_path: Path) -> None:
    """Each `# ...` line after a print in the README example is that print's output."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S)
    assert block is not None
    code = block.group(1)
    expected = [
        line[2:].split("   ")[0].strip() for line in code.splitlines() if line.startswith("# ")
    ]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert expected == [line.strip() for line in out.stdout.splitlines()]
