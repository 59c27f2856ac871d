"""`conceptkit evaluate cluster KEY`: Picasso's visual-based sub-concept clustering (VbSC) of a cluster artifact.

Picasso (Cai et al.), VbSC: each of the k sub-concepts is rendered to images on the same seeds
(`subconcepts.render`, by default mode `only`: every other kept neuron closed in its timestep
groups), the images are embedded, labelled by the sub-concept that drew them, and scored as a
clustering with Calinski-Harabasz, Davies-Bouldin and silhouette (`metrics.cluster_scores`).
Beside it: each sub-concept's diversity, CLIP score and shift from the unmodified image of the
same seed, and what the cluster artifact already holds (elbow over k and tau curve from its
sweeps, the timestep-similarity heatmap). `evaluate.vbsc` adds random-group baselines and
the toy analyser's readings for research runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from conceptkit import metrics, store
from conceptkit.errors import UsageError
from conceptkit.evaluate import common as evaluation
from conceptkit.features import check_spec, load_encoder, resolve_spec
from conceptkit.picasso.subconcepts import MODES, check_model, load_map, render_all
from conceptkit.settings import NULL_IN_KEY, key_settings

Progress = Callable[..., None]  # progress(stage, done, total)
VBSC_SCORES = ("calinski_harabasz", "davies_bouldin", "silhouette")


@dataclass(frozen=True)
class ClusterEvalConfig:
    """Settings of one VbSC evaluation; every field enters the cache key unless its metadata says otherwise (`settings`)."""

    per_subconcept: int = 16  # images per sub-concept, seeds seed .. seed+n-1 (the same for every sub-concept)
    mode: str = "only"  # only | close | scale: how the sub-concept's gates apply (subconcepts.gates)
    scale: float = 0.0  # output multiplier in mode scale
    seed: int = 0  # first seed
    encoder: str | None = None  # None: `auto` for the model (the toy CLIP on the toy)
    steps: int | None = None  # None: the model's default
    guidance: float | None = None  # None: the model's default
    batch_size: int = field(default=32, metadata=NULL_IN_KEY)  # images per sampling call

    def __post_init__(self) -> None:
        if not 2 <= self.per_subconcept <= 1024:
            raise UsageError(f"--count must be between 2 and 1024 (got {self.per_subconcept})")
        if self.mode not in MODES:
            raise UsageError(f"unknown --mode {self.mode!r}; use one of {', '.join(MODES)}")
        if not np.isfinite(self.scale):
            raise UsageError("--scale must be finite")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps must be at least 1 (got {self.steps})")
        if self.guidance is not None and self.guidance < 0:
            raise UsageError(f"--guidance must be 0 or more (got {self.guidance})")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.encoder is not None:
            check_spec(self.encoder)


def vbsc_scores(embeddings: np.ndarray) -> dict[str, float | None]:
    """Picasso's VbSC: (k, n, d) embeddings, row c drawn by sub-concept c, scored as a k-cluster labelling."""
    k, n = embeddings.shape[:2]
    s = metrics.cluster_scores(embeddings.reshape(k * n, -1), np.repeat(np.arange(k), n))
    return {name: getattr(s, name) for name in VBSC_SCORES}


def cluster_model_spec(key: str) -> str:
    """The --model a cluster artifact was made with (fails on an unknown key before any model loads)."""
    sub = load_map(key)
    return str(sub.model.get("spec") or "toy")


def run(model, key: str, cfg: ClusterEvalConfig, progress: Progress | None = None, on_wait=None) -> dict[str, Any]:
    """VbSC of cluster `key` (see the module doc); returns the JSON document, cached by key in the store."""
    started = time.perf_counter()
    sub = load_map(key)
    check_model(sub, model)
    art = store.find("cluster", sub.key)
    cm = art.manifest()
    encoder_spec = resolve_spec(cfg.encoder or "auto", model.spec)
    steps = cfg.steps or model.default_steps
    guidance = model.default_guidance if cfg.guidance is None else cfg.guidance
    settings = {**key_settings(cfg), "encoder": encoder_spec, "steps": steps, "guidance": guidance}
    ekey = evaluation.key_for("cluster", {"cluster": sub.key, "model": model.identity(), "settings": settings})
    hit = evaluation.cached(ekey, on_wait)
    if hit is not None:
        return evaluation.public(hit, True, time.perf_counter() - started)
    encoder = load_encoder(encoder_spec, model.spec, model.device)
    prompt = sub.prompts[0] if sub.prompts else cm["prompts"][0]
    text, clip_note = evaluation.text_embedding(encoder, prompt)
    seeds = list(range(cfg.seed, cfg.seed + cfg.per_subconcept))
    n, k = len(seeds), sub.k
    # 1. the unmodified images, then each sub-concept's on the same seeds
    base, images = render_all(model, sub, seeds, mode=cfg.mode, scale=cfg.scale, steps=steps, guidance=guidance,
                              batch_size=cfg.batch_size, prompt=prompt,
                              progress=progress and (lambda done, total: progress("rendering", done, total)))
    # 2. embed; label each image by its sub-concept; score as a clustering
    emb = evaluation.embed(encoder, images.flatten(0, 1), base)
    x = emb.a
    labels = np.repeat(np.arange(k), n)
    per = x.reshape(k, n, -1)
    rows = [{"cluster": c, **evaluation.set_scores(per[c], text), "shift_from_base": metrics.effect_size(emb.b, per[c])}
            for c in range(k)]
    # 3. what the cluster artifact holds: its own scores, sweeps (elbow, tau curve), the similarity heatmap
    arrays: dict[str, np.ndarray] = {"embeddings": x, "labels": labels, "base_embeddings": emb.b,
                                     "images": _images(images, model.spec == "toy"), "base_images": _images(base[None], model.spec == "toy")[0]}
    if text is not None:
        arrays["text_embedding"] = text
    sim = cm.get("arrays", {}).get("similarity_jaccard")
    if sim:
        arrays["similarity_jaccard"] = np.load(sim, allow_pickle=False)
    doc = {
        "what": "cluster", "cluster": sub.key, "prompt": prompt, "model": model.identity(), "encoder": encoder_spec,
        "k": k, "per_subconcept": n, "mode": cfg.mode, "scale": cfg.scale, "seed": cfg.seed, "steps": steps, "guidance": guidance,
        "sizes": sub.sizes(), "clip_available": text is not None, "clip_note": clip_note,
        "vbsc": vbsc_scores(per),
        "per_subconcept_scores": rows, "base": evaluation.set_scores(emb.b, text),
        "neuron_clustering": cm.get("metrics"), "timesteps": cm.get("timesteps", []), "sweeps": cm.get("sweeps") or {},
        "has": {"heatmap": bool(sim), "elbow": bool((cm.get("sweeps") or {}).get("k")), "tau_curve": bool((cm.get("sweeps") or {}).get("tau"))},
    }
    doc = evaluation.save_evaluation(ekey, doc, arrays, on_wait=on_wait)
    return evaluation.public(doc, False, time.perf_counter() - started)


def _images(images: torch.Tensor, full: bool) -> np.ndarray:
    """(k, n, 3, H, W) -> uint8 (k, m, h, w, 3): all on the toy, else an 8-image preview per sub-concept."""
    return np.stack([evaluation.to_uint8(g) if full else evaluation.preview(g, 8) for g in images])
