"""Hugging Face hub repositories: the local cache first, then a named, sized download.

A repository a run needs (a pipeline, the configs a single file borrows, an image encoder) is
looked up in the local Hugging Face cache without any network call. What is missing is listed
on the hub with a short timeout, announced one line per repository (files and size) and then
downloaded by huggingface_hub into its normal cache, with its progress bar. Offline
(`--offline` or `HF_HUB_OFFLINE=1`), unreachable, gated or unknown: one line saying what to run.
Nothing is written outside the Hugging Face cache.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from conceptkit.errors import ConceptkitError, ModelNotFoundError
from conceptkit.models.hub_files import (
    PICKLE_SUFFIXES, WEIGHTED, missing_repo_hint, require_model_index, select_encoder_files, select_pipeline_files,
)

LOOKUP_TIMEOUT_S = 5.0  # seconds a hub listing may take before the hub counts as unreachable
DEFAULT_ENDPOINT = "https://huggingface.co"
KINDS = ("pipeline", "config", "components", "encoder")  # components: a pipeline without its transformer's weights
_state = {"offline": False}


def set_offline(flag: bool) -> None:
    """Turn downloads off (or back on) for this process: the CLI's `--offline`."""
    _state["offline"] = bool(flag)


def is_offline() -> bool:
    """Whether downloads are off: `--offline`, or HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set to a true value now."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return _state["offline"] or env.strip().lower() in ("1", "true", "yes", "on")


def endpoint() -> str:
    """The hub's address: HF_ENDPOINT read now (a mirror, or a local test server), else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not when huggingface_hub was imported)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _repo_dir(repo_id: str) -> Path:
    return hf_cache_dir() / f"models--{repo_id.replace('/', '--')}"


def cached_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of `repo_id` (its `main` revision), or `ModelNotFoundError`; never the network."""
    repo_dir = _repo_dir(repo_id)
    snapshot = None
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snapshot = repo_dir / "snapshots" / ref.read_text().strip()
    else:  # downloaded by commit hash only: accept the single snapshot there is
        snapshots = sorted(p for p in (repo_dir / "snapshots").glob("*") if p.is_dir()) if repo_dir.is_dir() else []
        snapshot = snapshots[0] if len(snapshots) == 1 else None
    if snapshot is None or not snapshot.is_dir():
        raise ModelNotFoundError(
            f"{repo_id!r} is not in the local Hugging Face cache ({hf_cache_dir()}); run `hf download {repo_id}` "
            "or pass a local folder or file"
        )
    return snapshot


@dataclass(frozen=True)
class Need:
    """One hub repository a run needs, and how messages name it."""

    repo_id: str
    kind: str  # "pipeline" (a diffusers model) | "config" (configs and tokenizers only) | "components" (all but the
    # transformer's weights: what a FLUX / SD3 single file borrows) | "encoder" (transformers)
    role: str = "model"  # e.g. "model", "encoder clip:openai/clip-vit-large-patch14", "configs of x.safetensors"
    prefer_fp16: bool = False  # a pipeline run in half precision downloads fp16 weights where the repository has them
    alternative: str = "or pass a local folder or file"  # what else the user can do, ending every error

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Need.kind must be one of {KINDS}, got {self.kind!r}")

    def hint(self) -> str:
        return missing_repo_hint(self.repo_id, configs_only=self.kind == "config", skip_transformer=self.kind == "components")


@dataclass(frozen=True)
class Fetch:
    """What downloading one repository brings: the files a run needs, those still missing, their size."""

    need: Need
    revision: str  # the commit the listing came from
    files: tuple[str, ...]
    missing: tuple[str, ...]
    size: int | None  # bytes of `missing`; None when the listing gave no sizes

    def line(self) -> str:
        """One line for stderr naming the repository, what it is for, how many files and how big."""
        size = "size unknown" if self.size is None else _human(self.size)
        return f"downloading {self.need.role} {self.need.repo_id}: {len(self.missing)} files, {size}, into {hf_cache_dir()}"


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# ---- the local cache ----------------------------------------------------------------------

def local_state(need: Need) -> tuple[Path | None, str]:
    """(the cached snapshot when it holds what `need` loads, else None; why not), from the disk alone."""
    try:
        snapshot = cached_snapshot(need.repo_id)
    except ModelNotFoundError:
        return None, "not cached"
    if need.kind == "encoder":
        if not (snapshot / "config.json").is_file():
            return None, "cached without config.json"
        if not any(p.suffix == ".safetensors" or p.suffix in PICKLE_SUFFIXES for p in snapshot.glob("*")):
            return None, "cached without weights"
        return snapshot, ""
    index_file = snapshot / "model_index.json"
    if not index_file.is_file():
        return None, "cached without model_index.json"
    if need.kind == "config":
        return snapshot, ""
    try:
        index = json.loads(index_file.read_text())
    except ValueError:
        return snapshot, ""  # the loader's own check names the broken file
    for comp in WEIGHTED:
        if need.kind == "components" and comp == "transformer":
            continue
        if comp in index and isinstance(index[comp], list) and index[comp] and index[comp][0] is not None:
            sub = snapshot / comp
            if not any(p.suffix == ".safetensors" or p.suffix in PICKLE_SUFFIXES for p in sub.glob("*")):
                return None, f"cached with no weights in {comp}/"
    return snapshot, ""


# ---- the hub -------------------------------------------------------------------------------

def resolve(need: Need, say: Callable[[str], None] | None = None) -> Path:
    """The local snapshot of `need`: from the cache, else downloaded (announced through `say`, stderr by default)."""
    return prepare([need], say)[need.repo_id]


def prepare(needs: list[Need], say: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Make every repository in `needs` local: cached ones at once, the rest announced (one line each) and downloaded.

    Args:
        needs: the repositories a run will load; duplicates (by repo id) count once.
        say: where the announcements go (one line per repository to download); stderr by default.
    """
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    found: dict[str, Path] = {}
    missing: list[tuple[Need, str]] = []
    for need in needs:
        if need.repo_id in found or any(n.repo_id == need.repo_id for n, _ in missing):
            continue
        # 1. the local cache first: no network call for what is there
        snapshot, why = local_state(need)
        if snapshot is not None:
            found[need.repo_id] = snapshot
        else:
            missing.append((need, why))
    if not missing:
        return found
    # 2. offline: one line naming everything that is missing
    if is_offline():
        raise offline_error(missing)
    # 3. list what each missing repository needs (short timeouts), name it all, then download it
    fetches = [plan(need) for need, _ in missing]
    for fetch in fetches:
        say(fetch.line())
    for fetch in fetches:
        found[fetch.need.repo_id] = download(fetch)
    return found


def offline_error(missing: list[tuple[Need, str]]) -> ModelNotFoundError:
    """The one line an offline run without its repositories ends with."""
    items = "; ".join(f"{need.role} {need.repo_id} ({why})" for need, why in missing)
    commands = " and ".join(f"`{need.hint()}`" for need, _ in missing)
    return ModelNotFoundError(
        f"downloads are off (--offline or HF_HUB_OFFLINE=1) and the local Hugging Face cache ({hf_cache_dir()}) "
        f"lacks {items}; run {commands} where there is network, {missing[0][0].alternative}"
    )


def plan(need: Need) -> Fetch:
    """List `need` on the hub and choose its files (model_index.json is downloaded to read a pipeline's components)."""
    from huggingface_hub import HfApi, hf_hub_download

    try:
        info = HfApi(endpoint=endpoint()).model_info(
            need.repo_id, revision="main", files_metadata=True, timeout=_timeout()
        )
        files = {s.rfilename: _sibling_size(s) for s in (info.siblings or [])}
        revision = str(info.sha or "main")
        snapshot = _repo_dir(need.repo_id) / "snapshots" / revision
        present = {f for f in files if (snapshot / f).exists()}  # before model_index.json is fetched to plan
        if need.kind == "encoder":
            chosen = select_encoder_files(need.repo_id, files)
        else:
            require_model_index(need.repo_id, files)
            index_path = hf_hub_download(
                need.repo_id, "model_index.json", revision=revision, cache_dir=str(hf_cache_dir()),
                endpoint=endpoint(), etag_timeout=_timeout(),
            )
            index = json.loads(Path(index_path).read_text())
            chosen = select_pipeline_files(
                need.repo_id, index, files, prefer_fp16=need.prefer_fp16, configs_only=need.kind == "config",
                skip_weights=("transformer",) if need.kind == "components" else ()
            )
    except ConceptkitError:
        raise
    except Exception as err:  # noqa: BLE001 - huggingface_hub and httpx raise many kinds; each becomes one line
        raise failure(err, need) from err
    missing = tuple(f for f in chosen if f not in present)
    sizes = [files.get(f) for f in missing]
    size = None if any(s is None for s in sizes) else int(sum(sizes))
    return Fetch(need=need, revision=revision, files=tuple(chosen), missing=missing, size=size)


def download(fetch: Fetch) -> Path:
    """Download the files of `fetch` into the Hugging Face cache with huggingface_hub's progress bar."""
    from huggingface_hub import snapshot_download

    need = fetch.need
    try:
        with _progress_bars_on():
            snapshot_download(
                need.repo_id, revision="main", allow_patterns=list(fetch.files), cache_dir=str(hf_cache_dir()),
                endpoint=endpoint(), etag_timeout=_timeout(),
            )
    except Exception as err:  # noqa: BLE001 - see plan()
        raise failure(err, need) from err
    snapshot, why = local_state(need)
    if snapshot is None:
        raise ModelNotFoundError(f"downloaded {need.role} {need.repo_id}, but the cache is still {why}; rerun to resume")
    return snapshot


def failure(err: Exception, need: Need) -> ModelNotFoundError:
    """One line for a hub failure: gated (log in), not found, offline, or unreachable (download it elsewhere)."""
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError,
    )

    err = _root_cause(err, (HfHubHTTPError, OfflineModeIsEnabled))
    status = getattr(getattr(err, "response", None), "status_code", None)
    name = f"{need.role} {need.repo_id}"
    gated = isinstance(err, GatedRepoError) or (
        isinstance(err, HfHubHTTPError) and not isinstance(err, RepositoryNotFoundError) and status in (401, 403)
    )
    if gated:
        return ModelNotFoundError(
            f"{name} is gated or private on the Hugging Face Hub (HTTP {status}): accept its terms at "
            f"{endpoint()}/{need.repo_id}, log in with `hf auth login` and rerun, {need.alternative}"
        )
    if isinstance(err, RevisionNotFoundError):
        return ModelNotFoundError(f"{name} has no `main` revision on the Hugging Face Hub; {need.alternative}")
    if isinstance(err, RepositoryNotFoundError):
        return ModelNotFoundError(
            f"{name} was not found on the Hugging Face Hub (HTTP {status}): check the id; if it is private or gated, "
            f"log in with `hf auth login` and rerun, {need.alternative}"
        )
    if isinstance(err, OfflineModeIsEnabled):
        return offline_error([(need, "not cached")])
    detail = (str(err).strip().splitlines() or [""])[0][:200]
    return ModelNotFoundError(
        f"could not reach the Hugging Face Hub at {endpoint()} ({type(err).__name__}: {detail}) and {name} is not "
        f"in the local cache ({hf_cache_dir()}); run `{need.hint()}` where there is network, {need.alternative}"
    )


def _root_cause(err: BaseException, wanted: tuple[type, ...]) -> BaseException:
    """The first error of a kind in `wanted` along `err`'s cause chain (hf_hub_download wraps an HTTP 403
    in a LocalEntryNotFoundError), else `err` itself."""
    seen, link = set(), err
    while link is not None and id(link) not in seen:
        if isinstance(link, wanted):
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return err


def _timeout() -> float:
    """Seconds a look-up may wait: HF_HUB_ETAG_TIMEOUT when set, else LOOKUP_TIMEOUT_S."""
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or LOOKUP_TIMEOUT_S)
    except ValueError:
        return LOOKUP_TIMEOUT_S


def _sibling_size(sibling) -> int | None:
    size = getattr(sibling, "size", None)
    if size is None and getattr(sibling, "lfs", None) is not None:
        lfs = sibling.lfs
        size = lfs.get("size") if isinstance(lfs, dict) else getattr(lfs, "size", None)
    return int(size) if size is not None else None


@contextmanager
def _progress_bars_on():
    """huggingface_hub's download bars on for the download (model loading turns them off), unless the user disabled them."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_off = are_progress_bars_disabled()
    user_off = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().lower() in ("1", "true", "yes", "on")
    if was_off and not user_off:
        enable_progress_bars()
    try:
        yield
    finally:
        if was_off and not user_off:
            disable_progress_bars()
