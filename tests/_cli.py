"""Shared check for the CLI's bad-input contract: one line on stderr, exit 2, nothing on stdout."""

from __future__ import annotations


def one_line_error(result, code: int = 2) -> str:
    """Assert a Typer `CliRunner` result failed with one `error: ...` line and no traceback; return the line."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]
