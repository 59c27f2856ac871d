"""The toy scripts' argument parser: bad input is one `error: ...` line on stderr and exit 2, as in the CLI."""

from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose bad-input message is one `error: ...` line on stderr, exit 2 (no usage block)."""

    def error(self, message: str):
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)
