"""What `conceptkit evaluate` shares: embedding with a Fréchet distance, set scores, image folders, the cache.

Every evaluation embeds images once with an encoder (`features.load_encoder`) and computes its
numbers from those embeddings only, so the saved arrays reproduce every number:
- diversity: mean pairwise cosine distance and the Vendi score (`metrics`);
- CLIP score against a prompt, when the encoder has a text tower (`metrics.clip_score`);
- Fréchet distance between two sets: torchmetrics' `FrechetInceptionDistance` with our encoder as
  its `feature=` extractor (Inception weights cannot be downloaded here, and the Fréchet distance
  on CLIP/DINOv2 features is the stronger modern practice, Kynkäänniemi et al. 2023).
Results are artifacts of kind `evaluate`, keyed by what determines them; the arrays sit next to
the manifest as `.npy` (read back with `allow_pickle=False`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from conceptkit import metrics, store
from conceptkit.errors import DamagedArtifactError, UsageError
from conceptkit.features import check_spec, load_encoder, resolve_spec
from conceptkit.image_folder import folder_digest, read_images

FORMAT = 2  # bump when a document's fields change, so older cached results are recomputed
Progress = Callable[..., None]


class _Recorder(nn.Module):
    """The encoder as torchmetrics' feature extractor: float64 rows of its float32 output, each batch kept."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.num_features = int(encoder.dim)  # torchmetrics reads this instead of a dummy forward pass
        self.seen: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.encoder(images.to(self.encoder._device())).float().cpu()
        self.seen.append(out)
        return out.double()


@dataclass(frozen=True)
class Embedded:
    """Embeddings of one or two image sets and, for two, their Fréchet distance."""

    a: np.ndarray  # (n, d) float32
    b: np.ndarray | None  # (m, d) float32
    frechet: float | None


@torch.no_grad()
def embed(encoder, a: torch.Tensor, b: torch.Tensor | None = None, *, batch_size: int = 64,
          progress: Progress | None = None) -> Embedded:
    """Embed (n, 3, H, W) images in [0, 1] (and a second set); with two sets, torchmetrics' Fréchet distance.

    Args:
        encoder: a `features.ImageEncoder`.
        a, b: image batches; b may have another size (the encoder resizes).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    rec = _Recorder(encoder)
    fid = FrechetInceptionDistance(feature=rec, normalize=True) if b is not None else None
    total = len(a) + (len(b) if b is not None else 0)
    out: dict[bool, np.ndarray] = {}
    done = 0
    for real, images in ((True, a), (False, b)):
        if images is None:
            continue
        rec.seen = []
        for chunk in images.split(batch_size):
            if fid is not None:
                fid.update(chunk.float(), real=real)
            else:
                rec(chunk.float())
            done += len(chunk)
            if progress:
                progress(done, total)
        out[real] = torch.cat(rec.seen).numpy()
    frechet = float(fid.compute()) if fid is not None else None
    return Embedded(out[True], out.get(False), frechet)


def text_embedding(encoder, prompt: str | None) -> tuple[np.ndarray | None, str]:
    """(1, d) text embedding of the prompt, or None and why (no prompt, no text tower)."""
    if not prompt:
        return None, "no prompt given"
    if not encoder.has_text():
        return None, f"encoder {encoder.spec} has no text tower; pass --encoder clip:<id or folder> of a full CLIP model"
    return encoder.embed_text([prompt]).numpy().astype(np.float32), "ok"


def set_scores(emb: np.ndarray, text: np.ndarray | None) -> dict[str, Any]:
    """Diversity (mean pairwise cosine distance, Vendi score) and CLIP score of one set of embeddings."""
    return {"n": int(len(emb)), "diversity": metrics.mean_pairwise_distance(emb, "cosine"), "vendi": metrics.vendi_score(emb),
            "clip_score": metrics.clip_score(emb, text) if text is not None else None}


def to_uint8(images) -> np.ndarray:
    """(N, 3, H, W) float in [0, 1] (tensor or array) -> (N, H, W, 3) uint8, as saved, shown and read by the toy analyser."""
    a = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    return (np.clip(a, 0, 1).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def preview(images: torch.Tensor, n: int = 32, side: int = 128) -> np.ndarray:
    """The first `n` images as uint8 (n, h, w, 3), shrunk to at most `side` pixels: what a report shows."""
    import torch.nn.functional as F

    x = images[:n].float()
    h, w = x.shape[-2:]
    if max(h, w) > side:
        x = F.interpolate(x, size=(max(1, h * side // max(h, w)), max(1, w * side // max(h, w))), mode="bilinear", antialias=True)
    return to_uint8(x)


# ---------------------------------------------------------------- image folders


def load_image_folder(folder: Path, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, list[str]]:
    """(N, 3, H, W) images in [0, 1] from a folder (`image_folder`), resized to `size` (W, H) or the first's.

    Bad input (no such folder, no images, an unreadable file, a single image) is a `UsageError`.
    """
    arrays, names = read_images(folder, "image folder", size)
    if len(arrays) < 2:
        raise UsageError(f"{folder} holds one image; diversity and the Fréchet distance need at least 2")
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0, names


# ---------------------------------------------------------------- the cache


def cached(key: str, say=None) -> dict[str, Any] | None:
    """The finished evaluation with this key, or None (a damaged one is removed, saying so through `say`)."""
    art = store.artifact("evaluate", key)
    if not art.exists():
        return None
    try:
        doc = art.manifest()
    except DamagedArtifactError:
        with art.lock(on_wait=say):
            store.heal(art, say)
        return None
    return doc if doc.get("complete") else None


def save_evaluation(key: str, doc: dict[str, Any], arrays: dict[str, np.ndarray], on_wait=None) -> dict[str, Any]:
    """Write the arrays (.npy) and the manifest (the JSON document, with the arrays' paths) atomically."""
    art = store.artifact("evaluate", key)
    paths = {}
    with art.lock(on_wait=on_wait):
        for name, a in arrays.items():
            path = art.path / f"{name}.npy"
            with store.atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, np.asarray(a), allow_pickle=False)
            paths[name] = str(path)
        doc = {**doc, "key": key, "path": str(art.path), "arrays": paths}
        art.write_manifest({**doc, "created": time.time(), "complete": True})
    return doc


def load_arrays(doc: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of an evaluation, by name (no pickles), read from its own artifact folder only."""
    art = store.artifact("evaluate", doc["key"])
    out = {}
    for name in doc["arrays"]:
        path = art.file(f"{name}.npy", "array")
        try:
            out[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise art.damaged(f"array {path.name} does not read ({exc})") from exc
    return out


def public(doc: dict[str, Any], cached_: bool, seconds: float) -> dict[str, Any]:
    """The document printed with --json: the manifest less store bookkeeping, plus cached/seconds."""
    drop = ("complete", "created", "conceptkit_version")
    return {**{k: v for k, v in doc.items() if k not in drop}, "cached": cached_, "seconds": round(seconds, 3)}


def key_for(what: str, determinants: dict[str, Any]) -> str:
    return store.make_key({"format": FORMAT, "what": what, **determinants})


# ---------------------------------------------------------------- `evaluate images`


def run_images(a: Path, b: Path | None, prompt: str | None, encoder_spec: str, *, device: str = "cpu",
               progress: Progress | None = None, on_wait=None) -> dict[str, Any]:
    """Diversity and CLIP score of folder A (and B), and their Fréchet distance; cached by the folders' contents."""
    started = time.perf_counter()
    spec = resolve_spec(check_spec(encoder_spec), "toy")  # plain folders: `auto` is the toy CLIP
    if prompt is not None and not prompt.strip():
        raise UsageError("empty --prompt; leave it out to skip the CLIP score")
    # 1. read the folders first: bad input fails before an encoder loads
    xa, names_a = load_image_folder(a)
    xb, names_b = load_image_folder(b) if b is not None else (None, [])
    key = key_for("images", {"a": folder_digest(a, "image folder"), "b": folder_digest(b, "image folder") if b is not None else None, "prompt": prompt,
                             "encoder": spec})
    hit = cached(key, on_wait)
    if hit is not None:
        return public(hit, True, time.perf_counter() - started)
    # 2. embed once; every number comes from these embeddings
    encoder = load_encoder(spec, None, device)
    text, note = text_embedding(encoder, prompt)
    emb = embed(encoder, xa, xb, progress=progress)
    doc: dict[str, Any] = {
        "what": "images", "prompt": prompt, "encoder": spec, "clip_available": text is not None, "clip_note": note,
        "a": {"folder": str(a), "files": names_a, **set_scores(emb.a, text)},
        "b": {"folder": str(b), "files": names_b, **set_scores(emb.b, text)} if xb is not None else None,
        "frechet_distance": emb.frechet,
    }
    arrays = {"a_embeddings": emb.a, "a_images": preview(xa)}
    if xb is not None:
        arrays.update(b_embeddings=emb.b, b_images=preview(xb))
    if text is not None:
        arrays["text_embedding"] = text
    doc = save_evaluation(key, doc, arrays, on_wait=on_wait)
    return public(doc, False, time.perf_counter() - started)
