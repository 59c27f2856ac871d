"""The docs that come from the code are current, and the README's commands are the ones CI runs."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_is_current():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs" / "cli.md").read_text() == gen.render(), "run: python scripts/gen_cli_docs.py"


def test_readme_has_the_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- test-command -->\n```\w*\n(.+?)\n```\n<!-- /test-command -->", readme, re.S)
    assert block, "README.md must mark its test command"
    assert "pytest" in block.group(1)
    assert "<!-- main-command -->" in readme
    assert "README.md" in (ROOT / ".ci" / "run").read_text()


def test_changelog_has_unreleased_on_top():
    first = [line for line in (ROOT / "CHANGELOG.md").read_text().splitlines() if line.startswith("## ")][0]
    assert first.startswith("## Unreleased")
