"""Write docs/cli.md from the commands' own --help (tests/test_docs.py checks it is current).

    python scripts/gen_cli_docs.py
"""

from __future__ import annotations

import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
ENV = {"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb", "_TYPER_FORCE_DISABLE_TERMINAL": "1"}


def _paths(cmd, prefix):
    yield prefix
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from _paths(sub, prefix + [name])


def render() -> str:
    from typer.testing import CliRunner

    from conceptkit.cli import app

    runner = CliRunner()
    parts = ["# Command reference\n", "Generated from `--help` by `python scripts/gen_cli_docs.py`; do not edit by hand.\n"]
    import typer.main

    for path in _paths(typer.main.get_command(app), []):
        result = runner.invoke(app, [*path, "--help"], env=ENV, terminal_width=100)
        text = "\n".join(line.rstrip() for line in result.output.splitlines()).strip()
        parts.append(f"## `{' '.join(['conceptkit', *path])}`\n")
        parts.append(f"```text\n{text}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render())
    print(f"wrote {DOC}", file=sys.stderr)
