"""The artifact store: where artifacts live, how they are keyed, written, locked, listed and cleared.

Every artifact is a folder `<root>/<kind>/<key>/` holding a `manifest.json` and tensor files in
safetensors. Keys are hashes of what determines an artifact; named artifacts (slider sets)
use a validated name instead, which can never point outside the store. Files are written to a
temporary name and renamed, so a reader never sees half a file, and a lock per artifact keeps
two processes from writing the same one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import platformdirs
import torch
from safetensors.torch import save_file

from conceptkit import __version__
from conceptkit.errors import ArtifactNotFoundError, StoreError, UsageError

APP = "conceptkit"
MANIFEST = "manifest.json"
# Which root each kind lives under: recomputable caches versus user data worth keeping.
KINDS = {"harvest": "cache", "cluster": "cache", "evaluate": "cache", "sliders": "data", "neurons": "cache"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def roots() -> dict[str, Path]:
    """The cache and data roots: platformdirs by default, both under `CONCEPTKIT_HOME` if set."""
    home = os.environ.get("CONCEPTKIT_HOME")
    if home:
        base = Path(home).expanduser()
        return {"cache": base / "cache", "data": base / "data"}
    return {
        "cache": Path(platformdirs.user_cache_dir(APP)),
        "data": Path(platformdirs.user_data_dir(APP)),
    }


def kind_dir(kind: str) -> Path:
    if kind not in KINDS:
        raise UsageError(f"unknown artifact kind {kind!r}; expected one of {', '.join(KINDS)}")
    return roots()[KINDS[kind]] / kind


def make_key(determinants: dict[str, Any]) -> str:
    """A short stable hash of everything that determines an artifact (JSON-able values)."""
    blob = json.dumps(determinants, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_name(name: str, what: str = "name") -> str:
    """Refuse a user-given name that could escape the store or confuse a shell."""
    if not NAME_RE.match(name) or ".." in name:
        raise UsageError(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def slugify(text: str, limit: int = 48) -> str:
    """A safe default name made from a prompt: 'a person' -> 'a-person'."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return slug or "unnamed"


# ---------------------------------------------------------------- atomic writes


def _ensure_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create {path}: {exc.strerror or exc}; set CONCEPTKIT_HOME to a writable folder") from exc
    if not os.access(path, os.W_OK):
        raise StoreError(f"{path} is not writable; set CONCEPTKIT_HOME to a writable folder")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, else removed."""
    _ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc


# ---------------------------------------------------------------- artifacts


@dataclass(frozen=True)
class Artifact:
    """One artifact folder in the store."""

    kind: str
    key: str
    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict[str, Any]:
        try:
            return read_json(self.manifest_path)
        except FileNotFoundError as exc:
            raise ArtifactNotFoundError(f"no {self.kind} artifact {self.key!r} in {self.path.parent}") from exc

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest = {"kind": self.kind, "key": self.key, "conceptkit_version": __version__, **manifest}
        write_json(self.manifest_path, manifest)

    @contextmanager
    def lock(self, timeout: float = -1, on_wait=None) -> Iterator[None]:
        """Hold this artifact's lock; two processes never write one artifact at once."""
        _ensure_dir(self.path.parent)
        lock = filelock.FileLock(str(self.path.parent / f".{self.key}.lock"))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            if on_wait is not None:
                on_wait(f"another conceptkit process is writing {self.kind} {self.key}; waiting for it")
            try:
                lock.acquire(timeout=timeout)
            except filelock.Timeout as exc:
                raise StoreError(f"{self.kind} {self.key} is locked by another process") from exc
        try:
            yield
        finally:
            lock.release()

    def size(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def artifact(kind: str, key: str) -> Artifact:
    check_name(key, "key")
    return Artifact(kind, key, kind_dir(kind) / key)


def find(kind: str, key_or_prefix: str) -> Artifact:
    """An existing artifact by key or unique key prefix (at least 4 characters)."""
    check_name(key_or_prefix, "key")
    base = kind_dir(kind)
    exact = Artifact(kind, key_or_prefix, base / key_or_prefix)
    if exact.exists():
        return exact
    matches = sorted(p.name for p in base.glob(f"{key_or_prefix}*") if (p / MANIFEST).is_file()) if len(key_or_prefix) >= 4 else []
    if len(matches) == 1:
        return Artifact(kind, matches[0], base / matches[0])
    if len(matches) > 1:
        raise UsageError(f"{kind} key {key_or_prefix!r} is ambiguous: {', '.join(matches[:5])}")
    raise ArtifactNotFoundError(f"no {kind} artifact {key_or_prefix!r}; see `conceptkit cache list`")


# ---------------------------------------------------------------- list and clear


@dataclass(frozen=True)
class ArtifactInfo:
    kind: str
    key: str
    path: str
    prompt: str
    model: str
    size: int
    created: float
    complete: bool

    @property
    def age_seconds(self) -> float:
        return max(0.0, time.time() - self.created)


def list_artifacts(kind: str | None = None) -> list[ArtifactInfo]:
    infos = []
    for k in [kind] if kind else list(KINDS):
        base = kind_dir(k)
        if not base.is_dir():
            continue
        for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            art = Artifact(k, folder.name, folder)
            try:
                m = art.manifest()
            except (ArtifactNotFoundError, StoreError):
                m = {}
            prompts = m.get("prompts") or [m.get("prompt", "")]
            infos.append(
                ArtifactInfo(
                    kind=k,
                    key=folder.name,
                    path=str(folder),
                    prompt=str(prompts[0]) + (f" (+{len(prompts) - 1})" if len(prompts) > 1 else ""),
                    model=str((m.get("model") or {}).get("spec", "")),
                    size=art.size(),
                    created=float(m.get("created", folder.stat().st_mtime)),
                    complete=bool(m.get("complete", False)),
                )
            )
    return infos


def clear(kind: str | None = None, key: str | None = None) -> list[ArtifactInfo]:
    """Remove one artifact (kind and key), every artifact of a kind, or everything; returns what went."""
    if key is not None:
        kinds = [kind] if kind else [k for k in KINDS if (kind_dir(k) / key).is_dir()]
        targets = [i for k in kinds for i in list_artifacts(k) if i.key == key]
        if not targets:
            raise ArtifactNotFoundError(f"no artifact {key!r}; see `conceptkit cache list`")
    else:
        targets = list_artifacts(kind)
    for info in targets:
        art = Artifact(info.kind, info.key, Path(info.path))
        with art.lock():
            # rename first so a reader never sees a half-deleted artifact
            doomed = art.path.with_name(f".deleting-{art.key}-{os.getpid()}")
            os.replace(art.path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    return targets
