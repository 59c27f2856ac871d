"""Picasso's VbSC on the toy: render each sub-concept, embed the images, score them as a clustering.

Visual-based sub-concept clustering (Picasso, Cai et al.): the k sub-concepts are rendered to
images (`subconcepts.render`, the same seeds for every sub-concept), the images embedded with an
image encoder (the toy CLIP by default) and labelled by the sub-concept that drew them; the
labelled embeddings are scored as a clustering (Calinski-Harabasz, Davies-Bouldin, silhouette,
`metrics.cluster_scores`). The baseline is the same with random neuron groups of the same sizes:
the cluster's kept (timestep group, neuron) items with their labels permuted. On the toy, the
images are also read with the analyser (`conceptkit.toy.analyse`), so each sub-concept can be
named by the factor it changes: the share of images whose factor still matches the unmodified
image of the same seed, against the same share for the random groups.

Besides the paper's score on the images' embeddings, the same scores are computed on the
*differences* between each image's embedding and the unmodified image's of the same seed: what
the sub-concept changes, with the seed's own variation (background, position) taken out.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from conceptkit.diffusion import sample
from conceptkit.errors import UsageError
from conceptkit.evaluate.cluster import VBSC_SCORES, vbsc_scores
from conceptkit.features import load_encoder
from conceptkit.picasso.subconcepts import MODES, SubconceptMap, check_model, render
from conceptkit.toy import FACTORS, analyse_batch

SCORES = VBSC_SCORES


@dataclass(frozen=True)
class VbscConfig:
    """Settings of one VbSC measurement."""

    images: int = 32  # images per sub-concept: seeds seed .. seed+images-1, the same for every sub-concept
    draws: int = 5  # random neuron groupings (label permutations) for the baseline
    modes: tuple[str, ...] = ("close", "only")  # sub-concept modes measured
    encoder: str = "toy"  # image encoder spec (`features.load_encoder`)
    seed: int = 0  # first image seed; the permutations use seed, seed+1, ...
    steps: int | None = None  # None: the model's default
    guidance: float | None = None  # None: the model's default
    batch_size: int = 32
    analyse: bool = True  # read the images with the toy analyser (toy model only)

    def __post_init__(self) -> None:
        if self.images < 2:
            raise UsageError(f"images must be at least 2 (got {self.images})")
        if self.draws < 1:
            raise UsageError(f"draws must be at least 1 (got {self.draws})")
        bad = [m for m in self.modes if m not in MODES or m == "scale"]
        if not self.modes or bad:
            raise UsageError(f"modes must be close and/or only (got {self.modes})")


@dataclass(frozen=True)
class GroupReading:
    """What the analyser read from one group's images (a sub-concept or a random group)."""

    valid: float  # share of images the analyser could read
    agreement: dict[str, float]  # factor -> share of images (valid here and in the base) with the base image's value
    values: dict[str, dict[str, float]]  # factor -> value -> share among valid images


@dataclass(frozen=True)
class ModeResult:
    """VbSC of one mode: the sub-concepts' scores against random groups', and the factor readings."""

    mode: str
    scores: dict[str, float | None]  # the sub-concepts' images as a clustering
    random: list[dict[str, float | None]]  # the same per random draw
    diff_scores: dict[str, float | None]  # the same on embedding - the unmodified image's embedding (same seed)
    diff_random: list[dict[str, float | None]]
    readings: list[GroupReading] | None  # per sub-concept
    random_readings: list[list[GroupReading]] | None  # per draw, per group

    def random_mean_std(self, name: str, diff: bool = False) -> tuple[float, float]:
        v = np.array([r[name] for r in (self.diff_random if diff else self.random) if r[name] is not None], dtype=float)
        return (float(v.mean()), float(v.std())) if len(v) else (float("nan"), float("nan"))

    def effects(self) -> list[dict[str, float]]:
        """Per sub-concept, per factor: mean agreement of its random groups minus its own.

        Positive: this sub-concept changes the factor more than a random group of its size does.
        """
        if self.readings is None or not self.random_readings:
            return []
        out = []
        for c, own in enumerate(self.readings):
            out.append({f: float(np.mean([draw[c].agreement[f] for draw in self.random_readings]) - a)
                        for f, a in own.agreement.items()})
        return out


@dataclass(frozen=True)
class Vbsc:
    """A VbSC measurement of one cluster artifact."""

    key: str
    prompt: str
    sizes: list[int]
    base: GroupReading | None  # the unmodified images
    modes: list[ModeResult]
    seconds: float


def _read(images: torch.Tensor, base: list | None = None) -> tuple[GroupReading, list]:
    readings = analyse_batch(images.permute(0, 2, 3, 1).numpy())
    ok = [r for r in readings if r.valid]
    values = {f: {v: n / max(len(ok), 1) for v, n in Counter(r.factors[f] for r in ok).most_common()} for f in FACTORS}
    agreement = {}
    if base is not None:
        pairs = [(r, b) for r, b in zip(readings, base, strict=True) if r.valid and b.valid]
        agreement = {f: float(np.mean([r.factors[f] == b.factors[f] for r, b in pairs])) if pairs else float("nan") for f in FACTORS}
    return GroupReading(len(ok) / len(readings), agreement, values), readings


def _score(embeddings: list[torch.Tensor]) -> dict[str, float | None]:
    return vbsc_scores(torch.stack(embeddings).numpy())


def permuted(sub: SubconceptMap, seed: int) -> SubconceptMap:
    """Random neuron groups of the same sizes: the kept items with their labels permuted."""
    rng = np.random.default_rng(seed)
    return replace(sub, key=f"{sub.key}-random{seed}", labels=rng.permutation(sub.labels))


def vbsc(model, sub: SubconceptMap, cfg: VbscConfig = VbscConfig(), *, prompt: str | None = None,
         progress: Callable[[int, int], None] | None = None) -> Vbsc:
    """Measure how well a cluster's sub-concepts separate visually, against random neuron groups.

    Args:
        model: the `LoadedModel` the cluster was made on.
        sub: `subconcepts.load(key)`.
        cfg: images per sub-concept, random draws, modes, encoder.
        prompt: what to draw; None: the cluster's harvest prompt.
        progress: called with (groups rendered, groups in all).
    """
    started = time.perf_counter()
    check_model(sub, model)
    prompt = prompt or sub.prompts[0]
    analyse = cfg.analyse and model.spec == "toy"
    encoder = load_encoder(cfg.encoder, model.spec)
    seeds = list(range(cfg.seed, cfg.seed + cfg.images))
    steps = cfg.steps or model.default_steps
    guidance = model.default_guidance if cfg.guidance is None else cfg.guidance
    # 1. the unmodified images: what every agreement is measured against
    base_images = torch.cat([sample(model, prompt, seeds[i:i + cfg.batch_size], steps, guidance)
                             for i in range(0, len(seeds), cfg.batch_size)])
    base, base_readings = _read(base_images) if analyse else (None, None)
    base_emb = encoder.embed(base_images)
    total, done = len(cfg.modes) * sub.k * (1 + cfg.draws), 0

    def groups(s: SubconceptMap, mode: str) -> tuple[dict, dict, list[GroupReading] | None]:
        nonlocal done
        emb, readings = [], []
        for c in range(s.k):
            images = render(model, s, c, seeds, mode=mode, steps=steps, guidance=guidance, batch_size=cfg.batch_size, prompt=prompt)
            emb.append(encoder.embed(images))
            if analyse:
                readings.append(_read(images, base_readings)[0])
            done += 1
            if progress:
                progress(done, total)
        return _score(emb), _score([e - base_emb for e in emb]), (readings if analyse else None)

    # 2. per mode: the sub-concepts, then random groups of the same sizes
    results = []
    for mode in cfg.modes:
        scores, diff, readings = groups(sub, mode)
        rand, diff_rand, rand_readings = [], [], []
        for d in range(cfg.draws):
            s, sd, r = groups(permuted(sub, cfg.seed + d), mode)
            rand.append(s)
            diff_rand.append(sd)
            rand_readings.append(r)
        results.append(ModeResult(mode, scores, rand, diff, diff_rand, readings, rand_readings if analyse else None))
    return Vbsc(sub.key, prompt, sub.sizes(), base, results, time.perf_counter() - started)


def to_dict(res: Vbsc) -> dict[str, Any]:
    """A JSON-able summary: scores against the random groups' mean and std, and the factor readings."""
    def reading(r: GroupReading | None) -> dict[str, Any] | None:
        if r is None:
            return None
        return {"valid": round(r.valid, 4), "agreement": {f: round(a, 4) for f, a in r.agreement.items()},
                "top_values": {f: [(v, round(s, 3)) for v, s in list(vals.items())[:2]] for f, vals in r.values.items()}}

    modes = {}
    for m in res.modes:
        effects = m.effects()
        subs = []
        for c in range(len(res.sizes)):
            row: dict[str, Any] = {"subconcept": c, "size": res.sizes[c]}
            if m.readings is not None:
                row["reading"] = reading(m.readings[c])
                row["random_agreement"] = {f: round(float(np.mean([d[c].agreement[f] for d in m.random_readings])), 4)
                                           for f in m.readings[c].agreement}
                row["random_agreement_std"] = {f: round(float(np.std([d[c].agreement[f] for d in m.random_readings])), 4)
                                               for f in m.readings[c].agreement}
                row["effect"] = {f: round(e, 4) for f, e in effects[c].items()}
                row["changes_most"] = max(effects[c], key=effects[c].get)  # lost more than with a random group
                row["keeps_most"] = min(effects[c], key=effects[c].get)  # kept more than with a random group
            subs.append(row)
        modes[m.mode] = {
            **{prefix + "scores": scores for prefix, scores in (("", m.scores), ("diff_", m.diff_scores))},
            **{prefix + "random": {name: dict(zip(("mean", "std"), m.random_mean_std(name, diff))) for name in SCORES}
               for prefix, diff in (("", False), ("diff_", True))},
            "random_draws": m.random, "diff_random_draws": m.diff_random,
            **{prefix + "better_than_random": _better(scores, lambda name, diff=diff: m.random_mean_std(name, diff)[0])
               for prefix, scores, diff in (("", m.scores, False), ("diff_", m.diff_scores, True))},
            "subconcepts": subs,
        }
    return {"key": res.key, "prompt": res.prompt, "sizes": res.sizes, "base": reading(res.base), "modes": modes,
            "seconds": round(res.seconds, 2)}


def _better(scores: dict[str, float | None], random_mean: Callable[[str], float]) -> dict[str, bool]:
    """CH higher, DB lower, silhouette higher than the random groups' mean."""
    sign = {"calinski_harabasz": 1, "davies_bouldin": -1, "silhouette": 1}
    return {name: scores[name] is not None and sign[name] * (scores[name] - random_mean(name)) > 0 for name in SCORES}
