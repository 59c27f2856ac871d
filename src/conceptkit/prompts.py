"""Built-in context templates that diversify a concept without a language model."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from conceptkit.errors import UsageError

MAX_PROMPTS_FILE = 1 << 20  # bytes: a prompts file is text a person wrote, not data
MAX_PROMPTS = 10_000
MAX_PROMPT_CHARS = 2_000

# Contexts in the spirit of SliderSpace's prompt diversification (Gandikota et al. 2025, Sec. 4.1),
# fixed here so that diversifying a concept needs no language model.
TEMPLATES = (
    "{}",
    "a photo of {}",
    "a painting of {}",
    "a drawing of {}",
    "a close-up photo of {}",
    "a photo of {} outdoors",
    "a photo of {} indoors",
    "a black and white photo of {}",
    "a cartoon of {}",
    "a 3d render of {}",
    "a sketch of {}",
    "a watercolour of {}",
)


def expand_templates(concepts: Sequence[str], templates: Sequence[str] = TEMPLATES) -> list[str]:
    """Each concept in every template, concept-major, duplicates removed."""
    return list(dict.fromkeys(t.format(c) for c in concepts for t in templates))


def read_prompts_file(path: Path, option: str = "--prompts-file") -> list[str]:
    """One prompt per line ('#' comments and blank lines skipped), from a small UTF-8 text file.

    Devices, pipes and folders are refused before anything is read (`/dev/zero` would never end,
    a FIFO would wait forever), and so are files over 1 MiB, binary files and invalid UTF-8.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        raise UsageError(f"{option}: cannot read prompts file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{option} {path} is not a regular file (a folder, device or pipe); give a text file")
    if info.st_size > MAX_PROMPTS_FILE:
        raise UsageError(f"{option} {path} is {info.st_size:,} bytes; a prompts file may have at most {MAX_PROMPTS_FILE:,}")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROMPTS_FILE + 1)
    except OSError as exc:
        raise UsageError(f"{option}: cannot read prompts file {path}: {exc.strerror or exc}") from None
    if b"\0" in data:
        raise UsageError(f"{option} {path} is a binary file (it holds NUL bytes); give UTF-8 text, one prompt per line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{option} {path} is not UTF-8 text (byte {exc.start}); give UTF-8 text, one prompt per line") from None
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise UsageError(f"{option} {path} has no prompts")
    if len(lines) > MAX_PROMPTS:
        raise UsageError(f"{option} {path} has {len(lines):,} prompts; at most {MAX_PROMPTS:,} are allowed")
    longest = max(lines, key=len)
    if len(longest) > MAX_PROMPT_CHARS:
        raise UsageError(f"{option} {path}: a prompt has {len(longest):,} characters; at most {MAX_PROMPT_CHARS:,} are allowed")
    return lines
