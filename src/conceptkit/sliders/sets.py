"""Slider sets in the store: list, show, rename, export, and resolve `[SET/]LABEL_OR_INDEX=SCALE`."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from conceptkit import store
from conceptkit.errors import ArtifactNotFoundError, DamagedArtifactError, UsageError
from conceptkit.infotext import slider_lora_name
from conceptkit.sliders.bank import load_slider_file, save_slider_file
from conceptkit.sliders.kohya import export_kohya as write
from conceptkit.sliders.pipeline import SliderInfo, SliderSet, from_manifest

LABEL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,47}$")
REF_RE = re.compile(r"^(?:(?P<set>[^/=\s]+)/)?(?P<slider>[^/=\s]+)=(?P<scale>.+)$")


def _folders() -> list[Path]:
    base = store.kind_dir("sliders")
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))


def list_sets() -> list[SliderSet]:
    """Every complete, sound slider set in the store, by name (see `damaged_sets` for the others)."""
    out = []
    for folder in _folders():
        try:
            m = store.Artifact("sliders", folder.name, folder).manifest()
        except (ArtifactNotFoundError, DamagedArtifactError):
            continue
        if m.get("complete"):
            out.append(from_manifest(folder, m))
    return out


def damaged_sets() -> list[DamagedArtifactError]:
    """The set folders whose manifest does not read or does not pass the schema, one error each."""
    out = []
    for folder in _folders():
        try:
            store.Artifact("sliders", folder.name, folder).manifest()
        except DamagedArtifactError as exc:
            out.append(exc)
        except ArtifactNotFoundError:
            continue
    return out


def load_set(name: str) -> SliderSet:
    """The set called `name`, or `ArtifactNotFoundError` listing what there is (`DamagedArtifactError`
    naming its path and the command that clears it if its manifest is unsound)."""
    store.check_name(name, "slider set name")
    art = store.artifact("sliders", name)
    if not art.exists():
        have = ", ".join(s.name for s in list_sets()) or "none yet; train one with `conceptkit sliders PROMPT`"
        raise ArtifactNotFoundError(f"no slider set {name!r}; sets: {have}")
    return from_manifest(art.path, art.manifest())


def find_slider(sset: SliderSet, label_or_index: str) -> SliderInfo:
    """A slider of `sset` by label (case-insensitive) or by index (0 = most variance)."""
    if re.fullmatch(r"\d+", label_or_index):
        i = int(label_or_index)
        if i >= len(sset.sliders):
            raise UsageError(f"slider index {i} out of range: set {sset.name!r} has {len(sset.sliders)} sliders (0-{len(sset.sliders) - 1})")
        return sset.sliders[i]
    for s in sset.sliders:
        if s.label.lower() == label_or_index.lower():
            return s
    raise UsageError(f"set {sset.name!r} has no slider {label_or_index!r}; labels: {', '.join(s.label for s in sset.sliders)}")


def rename(name: str, old: str, new: str) -> SliderSet:
    """Relabel slider `old` (label or index) of set `name` as `new`; labels stay unique."""
    if not LABEL_RE.match(new) or re.fullmatch(r"\d+", new):
        raise UsageError(f"invalid label {new!r}: start with a letter; letters, digits, '.', '_' or '-', at most 48")
    sset = load_set(name)
    art = store.artifact("sliders", name)
    with art.lock():
        sset = load_set(name)
        target = find_slider(sset, old)
        if any(s.label.lower() == new.lower() and s.index != target.index for s in sset.sliders):
            raise UsageError(f"set {name!r} already has a slider labelled {new!r}")
        m = sset.manifest
        m["sliders"][target.index]["label"] = new
        file = slider_path(sset, target)  # never a file outside the set
        loaded = load_slider_file(file)
        meta = {**loaded.metadata, "label": new}
        with store.atomic_path(file) as tmp:
            save_slider_file(loaded.factors, tmp, meta, slider_index=target.index)
        art.write_manifest({k: v for k, v in m.items() if k not in ("kind", "key", "conceptkit_version")})
    return load_set(name)


def export_set(name: str, folder: Path, warn: Callable[[str], None] | None = None) -> list[Path]:
    """Write every slider of set `name` as `<folder>/<set>-<index>-<label>.safetensors` in kohya format.

    `warn` gets one line (for the whole set) when some modules are ones kohya sd-scripts never loads."""
    sset = load_set(name)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--export folder {folder} is a file")

    jobs = [(slider_path(sset, s), store.inside(folder, f"{slider_lora_name(sset.name, s.index, s.label)}.safetensors",
                                                 "export file")) for s in sset.sliders]
    return [write(src, dest, warn=warn if i == 0 else None) for i, (src, dest) in enumerate(jobs)]


def slider_path(sset: SliderSet, slider: SliderInfo) -> Path:
    """The file of `slider`, checked to be a plain name that resolves inside the set's folder."""
    return store.inside(sset.path, slider.file, f"slider set {sset.name!r} file")


# ---------------------------------------------------------------- --slider references


@dataclass(frozen=True)
class SliderRef:
    """A parsed `--slider [SET/]LABEL_OR_INDEX=SCALE`."""

    set: str | None
    slider: str
    scale: float


MAX_STRENGTH = 100.0  # beyond this a LoRA only saturates the image (1e30 gives NaN and a black PNG)


def parse_ref(text: str) -> SliderRef:
    m = REF_RE.match(text.strip())
    if not m:
        raise UsageError(f"malformed --slider {text!r}: write [SET/]LABEL_OR_INDEX=SCALE, e.g. age=1.5 or a-person/3=-2")
    try:
        scale = float(m["scale"])
    except ValueError:
        raise UsageError(f"--slider {text!r}: scale {m['scale']!r} is not a number") from None
    if not math.isfinite(scale) or abs(scale) > MAX_STRENGTH:
        raise UsageError(f"--slider {text!r}: scale must be a finite number between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g}")
    if m["set"] is not None:
        store.check_name(m["set"], "slider set name")
    return SliderRef(m["set"], m["slider"], scale)


def sets_for(prompt: str, model_identity: dict) -> list[SliderSet]:
    """Sets trained for this prompt on this model (same weights fingerprint)."""
    return [s for s in list_sets() if s.prompt == prompt and s.manifest["model"].get("fingerprint") == model_identity.get("fingerprint")]


def resolve(ref: SliderRef, prompt: str, model_identity: dict) -> tuple[SliderSet, SliderInfo]:
    """Find the set and slider a reference names; without SET, the set for the same prompt and model."""
    if ref.set is not None:
        sset = load_set(ref.set)
        return sset, find_slider(sset, ref.slider)
    candidates = sets_for(prompt, model_identity)
    if not candidates:
        raise UsageError(f"no slider set trained for {prompt!r} on {model_identity.get('spec')}; name one as SET/{ref.slider}="
                         f"{ref.scale:g} (see `conceptkit sliders list`) or train it with `conceptkit sliders {prompt!r}`")
    matches = []
    for sset in candidates:
        try:
            matches.append((sset, find_slider(sset, ref.slider)))
        except UsageError:
            continue
    if not matches:
        raise UsageError(f"no slider {ref.slider!r} in the sets for {prompt!r}: "
                         + "; ".join(f"{s.name}: {', '.join(x.label for x in s.sliders)}" for s in candidates))
    if len(matches) > 1:
        raise UsageError(f"slider {ref.slider!r} is ambiguous; candidates: "
                         + ", ".join(f"{s.name}/{x.label}" for s, x in matches) + "; write SET/LABEL=SCALE")
    return matches[0]
