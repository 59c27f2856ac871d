"""Domain errors. Each carries the exit code that `cli/` turns it into."""

from __future__ import annotations


class ConceptkitError(Exception):
    """A failure the user can act on; printed as one line, never as a traceback."""

    exit_code = 1


class UsageError(ConceptkitError):
    """Bad input: an option out of range, an unreadable file, an unknown name."""

    exit_code = 2


class ModelNotFoundError(UsageError):
    """The model is not on disk and cannot be downloaded now (offline, unreachable, gated or unknown)."""


class UnsupportedModelError(UsageError):
    """The model exists but is of an architecture conceptkit does not handle."""


class ArtifactNotFoundError(UsageError):
    """No artifact in the store matches the key or name given."""


class StoreError(ConceptkitError):
    """The store cannot be read or written (permissions, a full disk)."""

    exit_code = 2


class DamagedArtifactError(StoreError):
    """An artifact in the store is unreadable or malformed; the message names its path and the fix."""

    def __init__(self, message: str, *, problem: str = "", path=None, kind: str | None = None, key: str | None = None):
        super().__init__(message)
        self.problem, self.path, self.kind, self.key = problem or message, path, kind, key
