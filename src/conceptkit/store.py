"""The artifact store: where artifacts live, how they are keyed, written, locked, listed and cleared.

Every artifact is a folder `<root>/<kind>/<key>/` holding a `manifest.json` and tensor files in
safetensors. Keys are hashes of what determines an artifact; named artifacts (slider sets)
use a validated name instead, which can never point outside the store. Files are written to a
temporary name and renamed, so a reader never sees half a file, and a lock per artifact keeps
two processes from writing the same one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
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
from conceptkit.errors import ArtifactNotFoundError, DamagedArtifactError, StoreError, UsageError
from conceptkit.jsondata import finite_json
from conceptkit.store_schema import NAME_RE, SCHEMA_VERSION, check_manifest

APP = "conceptkit"
MANIFEST = "manifest.json"
# Which root each kind lives under: recomputable caches versus user data worth keeping.
KINDS = {"harvest": "cache", "cluster": "cache", "evaluate": "cache", "sliders": "data", "neurons": "cache", "implant": "data"}


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


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, else removed.

    The file gets the mode a plain write would (0666 less the umask), not mkstemp's 0600.
    """
    _ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # after the write: some writers replace the file
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            # a full disk or a lost mount: one line naming the file, not a traceback
            raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(finite_json(data), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")


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

TMP_RE = re.compile(r"^\..+\.tmp$")  # what `atomic_path` leaves when a process dies mid-write


def clear_hint(kind: str, key: str) -> str:
    return f"remove it with `conceptkit cache clear {key} --kind {kind}`"


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

    def damaged(self, problem: str) -> DamagedArtifactError:
        """The error for this artifact being unusable: what is wrong, where, and how to clear it."""
        return DamagedArtifactError(f"damaged {self.kind} artifact {self.path}: {problem}; {clear_hint(self.kind, self.key)}",
                                    problem=problem, path=self.path, kind=self.kind, key=self.key)

    def manifest(self) -> dict[str, Any]:
        """The manifest, checked against its kind's schema (`DamagedArtifactError` if it fails)."""
        try:
            data = json.loads(self.manifest_path.read_text())
        except FileNotFoundError as exc:
            raise ArtifactNotFoundError(f"no {self.kind} artifact {self.key!r} in {self.path.parent}") from exc
        except (OSError, ValueError) as exc:
            raise self.damaged(f"{MANIFEST} is not readable JSON ({exc})") from exc
        problems = check_manifest(self.kind, data)
        if problems:
            raise self.damaged(f"{MANIFEST} {problems[0]}")
        return data

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest = {"kind": self.kind, "key": self.key, "conceptkit_version": __version__, **manifest,
                    "schema": SCHEMA_VERSION}
        problems = check_manifest(self.kind, json.loads(json.dumps(manifest, default=str)))
        if problems:  # the writer and the readers share one schema
            raise StoreError(f"refusing to write an invalid {self.kind} manifest to {self.path}: {problems[0]}")
        write_json(self.manifest_path, manifest)

    def file(self, name: str, what: str = "file") -> Path:
        """`name` inside this artifact, refused if it is not a plain name or resolves outside the folder."""
        return inside(self.path, name, f"{self.kind} {self.key} {what}")

    @property
    def _holder_path(self) -> Path:
        return self.path.parent / f".{self.key}.holder"

    def holder(self) -> str:
        """Who holds this artifact's lock, as the holder wrote it (or 'another conceptkit process')."""
        try:
            h = json.loads(self._holder_path.read_text())
            return f"process {int(h['pid'])} ({str(h['command'])[:80]}, since {time.strftime('%H:%M:%S', time.localtime(float(h['since'])))})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another conceptkit process"

    @contextmanager
    def lock(self, timeout: float = -1, on_wait=None) -> Iterator[None]:
        """Hold this artifact's lock; two processes never write one artifact at once.

        The holder leaves its pid and command beside the lock, so a waiter can say whom it waits
        for. Once held, temporary files a killed writer left in the folder are removed, and an
        artifact folder left empty (a failed first write) is removed on release.
        """
        _ensure_dir(self.path.parent)
        lock = filelock.FileLock(str(self.path.parent / f".{self.key}.lock"))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            if on_wait is not None:
                on_wait(f"{self.kind} {self.key} is locked by {self.holder()}; waiting for it")
            try:
                lock.acquire(timeout=timeout)
            except filelock.Timeout as exc:
                raise StoreError(f"{self.kind} {self.key} is locked by {self.holder()}") from exc
        try:
            command = " ".join(["conceptkit", *sys.argv[1:3]]) if sys.argv else "conceptkit"
            with contextlib.suppress(OSError):  # advisory only: a full disk must not stop the work here
                self._holder_path.write_text(json.dumps({"pid": os.getpid(), "command": command, "since": time.time()}))
            self.sweep_temporary()
            yield
        finally:
            self._holder_path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                if self.path.is_dir() and not self.path.is_symlink() and not any(self.path.iterdir()):
                    self.path.rmdir()
            lock.release()

    def sweep_temporary(self) -> int:
        """Remove the temporary files of interrupted writes (call with the lock held); bytes freed."""
        freed = 0
        if self.path.is_dir() and not self.path.is_symlink():
            for f in self.path.iterdir():
                if TMP_RE.match(f.name) and f.is_file() and not f.is_symlink():
                    freed += f.lstat().st_size
                    f.unlink(missing_ok=True)
        return freed

    def temporary_files(self) -> list[Path]:
        if not self.path.is_dir() or self.path.is_symlink():
            return []
        return [f for f in self.path.iterdir() if TMP_RE.match(f.name) and f.is_file() and not f.is_symlink()]

    def size(self) -> int:
        """Bytes of the files in the folder; links count as links, never as what they point to."""
        if self.path.is_symlink() or not self.path.is_dir():
            return 0
        total = 0
        for root, dirs, files in os.walk(self.path):  # os.walk never descends into linked folders
            for f in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, f)).st_size
        return total


def inside(folder: Path, name: str, what: str = "file") -> Path:
    """`folder / name` for a plain file name; refused (`UsageError`) if `name` holds a folder part
    or the path resolves (through links) outside `folder`."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise UsageError(f"{what} {name!r} is not a plain file name; refusing to use it")
    path = Path(folder) / name
    if not path.resolve().is_relative_to(Path(folder).resolve()):
        raise UsageError(f"{what} {name!r} resolves outside {folder}; refusing to use it")
    return path


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


def heal(art: Artifact, say=None) -> bool:
    """A damaged cache artifact is removed so that it is computed again (saying so in one line);
    True if it was. Slider sets are user data: a damaged one raises instead, naming the fix."""
    if not art.exists():
        return False
    try:
        art.manifest()
        return False
    except DamagedArtifactError as exc:
        if KINDS[art.kind] != "cache":
            raise
        if say is not None:
            say(f"damaged {art.kind} artifact {art.path}: {exc.problem}; recomputing it")
        remove_tree(art.path)
        return True


def publish(tmp: Path, dest: Path) -> None:
    """Move a finished temporary folder into place as `dest`, replacing what was there: readers see
    the old artifact or the new one, never a half-written mix."""
    if dest.exists():
        old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
        os.replace(dest, old)
        remove_tree(old)
    os.replace(tmp, dest)


def remove_tree(path: Path) -> None:
    """Remove an artifact folder; a link (the folder itself or anything inside) goes, never its target."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)  # rmtree unlinks links inside and never follows them
