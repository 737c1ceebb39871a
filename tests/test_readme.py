import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
pytestmark = pytest.mark.skipif(not README.is_file(), reason="needs the source tree")


def test_readme_has_exactly_two_setup_commands_and_ci_reads_the_test_one():
    text = README.read_text()
    block = re.search(r"<!-- test-command:start -->\s*```bash\n(.+?)\n```\s*<!-- test-command:end -->", text, re.S)
    assert block, "README must hold the test command between the test-command markers"
    assert "pytest" in block.group(1) and ".[test]" in block.group(1)
    setup = re.findall(r"```bash\n(python -m pip install[^\n]*)\n```", text)
    assert len(setup) == 2
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command:start" in ci and "README.md" in ci
