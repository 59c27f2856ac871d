"""`conceptkit evaluate sliders SET|FILE`: SliderSpace's concept-decomposition experiment on a slider set (or a LoRA file, `evaluate.lora`).

Gandikota et al. (2025), Sec. 5.2: N images of the prompt from the base model and N with a random
sparse combination of sliders each (3 per image, strengths uniform in [-scale, scale], seeded);
both sets are scored for diversity (mean pairwise cosine distance, Vendi score) and CLIP score
against the prompt, and compared by their Fréchet distance. Per slider, the first `effect_count`
seeds are drawn at -s and +s: the effect size is `metrics.effect_size(base, +s)` and the cosine
matrix of the sliders' mean effects says how orthogonal the set is. On the toy model the same
images give the factor-recovery table, in three rows (sliders, random rank-1 directions, prompt
edits) read per seed and per distribution on `factor_seeds` seeds (`evaluate.toy_factors`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from conceptkit import metrics
from conceptkit.diffusion import same_weights
from conceptkit.errors import UsageError
from conceptkit.evaluate import common as evaluation
from conceptkit.evaluate import toy_factors
from conceptkit.evaluate.slider_draws import draw, randomise, signed_images
from conceptkit.features import check_spec, load_encoder, resolve_spec
from conceptkit.settings import IN_KEY_UNLESS_DEFAULT, NULL_IN_KEY, key_settings
from conceptkit.sliders.apply import SliderModification, random_combinations
from conceptkit.toy import factors
from conceptkit.toy.edits import EDITS

Progress = Callable[..., None]  # progress(stage, done, total)


@dataclass(frozen=True)
class SliderEvalConfig:
    """Settings of one slider-set evaluation; every field enters the cache key unless its metadata says otherwise (`settings`)."""

    count: int = 64  # N images per side (base and sliders), seeds seed .. seed+N-1
    per_image: int = 3  # sliders in each image's random combination (the paper's sparse 3)
    scale: float = 2.0  # random strengths are uniform in [-scale, scale]
    effect_count: int = 16  # seeds per slider drawn at -effect_strength and +effect_strength
    effect_strength: float = 2.0  # strength of the per-slider effect images
    factor_seeds: int = 64  # toy only: seeds of the factor table (sliders, random directions, prompt edits; 2x base seeds)
    seed: int = 0  # first seed; also seeds the random combinations
    encoder: str | None = None  # None: the encoder the set was trained with
    batch_size: int = field(default=32, metadata=NULL_IN_KEY)  # images per sampling call
    random_baseline: bool = field(default=False, metadata=IN_KEY_UNLESS_DEFAULT)  # also: the same combinations of random rank-1 directions

    def __post_init__(self) -> None:
        if not 2 <= self.count <= 4096:
            raise UsageError(f"--count must be between 2 and 4096 (got {self.count})")
        if self.per_image < 1:
            raise UsageError(f"--per-image must be at least 1 (got {self.per_image})")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise UsageError(f"--scale must be a positive number (got {self.scale})")
        if not 2 <= self.effect_count <= self.count:
            raise UsageError(f"--effect-count must be between 2 and --count ({self.count}) (got {self.effect_count})")
        if not (np.isfinite(self.effect_strength) and self.effect_strength > 0):
            raise UsageError(f"--effect-strength must be a positive number (got {self.effect_strength})")
        if not 2 <= self.factor_seeds <= 4096:
            raise UsageError(f"--factor-seeds must be between 2 and 4096 (got {self.factor_seeds})")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.encoder is not None:
            check_spec(self.encoder)


BOOTSTRAP = 1000  # paired resamples of the seeds behind each interval
LEVEL = 0.95
CLIP_TOLERANCE = 0.05  # "the CLIP score holds": the whole interval of its relative change within +-5%


def intervals(base: np.ndarray, slid: np.ndarray, text: np.ndarray | None, seed: int) -> dict[str, Any]:
    """95% paired-bootstrap intervals of the three comparisons, and the two verdicts they support.

    Row i of `base` and `slid` come from seed i, so the seeds are resampled jointly
    (`metrics.paired_bootstrap`, BOOTSTRAP resamples drawn from `seed`, the same ones for every
    number). An interval is None where its ratio is undefined; `diversity_higher` is whether the
    diversity ratio's interval lies above 1, `clip_within_5pct` whether the CLIP score change's
    lies within [-0.05, 0.05] (None without a text embedding).
    """
    def ci(stat):
        out = metrics.paired_bootstrap(base, slid, stat, n_boot=BOOTSTRAP, seed=seed, level=LEVEL)
        return None if out is None else list(out)

    div = ci(metrics.resampled_mean_pairwise_distance)
    vendi = ci(metrics.resampled_vendi_score)
    clip = ci(lambda x, c: metrics.resampled_clip_score(x, text, c)) if text is not None else None
    clip = None if clip is None else [clip[0] - 1.0, clip[1] - 1.0]
    return {"diversity_ratio_ci": div, "vendi_ratio_ci": vendi, "clip_score_change_ci": clip,
            "ci_level": LEVEL, "ci_resamples": BOOTSTRAP,
            "diversity_higher": None if div is None else div[0] > 1.0,
            "clip_within_5pct": None if clip is None else (-CLIP_TOLERANCE <= clip[0] and clip[1] <= CLIP_TOLERANCE)}


def determinants(sset, model, cfg: SliderEvalConfig, encoder_spec: str, teacher=None) -> dict[str, Any]:
    return {**({"teacher": teacher.identity()} if teacher is not None else {}), "set": sset.name, "set_key": sset.manifest.get("settings_key"), "labels": [s.label for s in sset.sliders],
            "model": model.identity(), "settings": {**key_settings(cfg), "encoder": encoder_spec,
                                                    "factor_seeds": cfg.factor_seeds if model.spec in ("toy", "toy-turbo") else None}}


def run(model, sset, cfg: SliderEvalConfig, progress: Progress | None = None, on_wait=None, teacher=None) -> dict[str, Any]:
    """The experiment (see the module doc); returns the JSON document, cached by key in the store.

    With `teacher` (a loaded model, e.g. the one a distilled `model` was made from), the teacher's
    images of the prompt on the same seeds are the reference: the Fréchet distance to them of the
    base images and of the slider images (SliderSpace, Sec. 5.3: sliders on a distilled model bring
    its images closer to what the teacher draws), with the distance between the two halves of the
    teacher's own images as the floor.
    """

    started = time.perf_counter()
    if not same_weights(sset.manifest["model"], model):
        raise UsageError(f"slider set {sset.name!r} was trained for {sset.manifest['model'].get('spec')}, not these weights "
                         f"({model.spec}); evaluate it with --model {sset.manifest['model'].get('spec')}")
    if cfg.random_baseline and getattr(sset, "modification", None) is not None:
        raise UsageError("--random-baseline draws random directions of a slider set's own factors; a LoRA file has none to draw from")
    encoder_spec = resolve_spec(cfg.encoder or sset.manifest["encoder"], model.spec)
    key = evaluation.key_for("sliders", determinants(sset, model, cfg, encoder_spec, teacher))
    hit = evaluation.cached(key, on_wait)
    if hit is not None:
        if "diversity_ratio_ci" not in hit:  # cached before the intervals existed: they come from its saved arrays
            arr = evaluation.load_arrays(hit)
            hit = {**hit, **intervals(arr["base_embeddings"], arr["slider_embeddings"], arr.get("text_embedding"), cfg.seed)}
        return evaluation.public(hit, True, time.perf_counter() - started)
    encoder = load_encoder(encoder_spec, model.spec, model.device)
    text, clip_note = evaluation.text_embedding(encoder, sset.prompt)
    steps, guidance = int(sset.manifest["steps"]), float(sset.manifest["guidance"])
    seeds = list(range(cfg.seed, cfg.seed + cfg.count))
    k = len(sset.sliders)
    indices = [s.index for s in sset.sliders]
    toy = model.spec in ("toy", "toy-turbo")
    # on the toy the per-slider images also feed the factor table, on factor_seeds seeds
    n_signed = max(cfg.effect_count, cfg.factor_seeds) if toy else cfg.effect_count
    signed_seeds = list(range(cfg.seed, cfg.seed + n_signed))
    total = 2 * cfg.count + 2 * k * n_signed + (cfg.count if teacher is not None else 0) + (cfg.count if cfg.random_baseline else 0)
    if toy:
        total += 2 * k * cfg.factor_seeds + 2 * len(EDITS) * cfg.factor_seeds + 2 * cfg.factor_seeds
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress:
            progress("sampling", done[0], total)

    # 1. base images, and images with a random sparse combination of sliders (same seeds)
    weights = random_combinations(cfg.count, k, cfg.per_image, cfg.scale, cfg.seed)
    base = draw(model, None, sset.prompt, seeds, None, steps, guidance, cfg.batch_size, tick)
    make = getattr(sset, "modification", None)  # a LoRA file (lora_eval.LoraFileSet) brings its own adapter
    mod = make(model, guidance > 1.0) if make else SliderModification(model.pipe.unet, [(sset, s) for s in sset.sliders],
                                                                      cfg_batches=guidance > 1.0)
    try:
        slid = draw(model, mod, sset.prompt, seeds, weights, steps, guidance, cfg.batch_size, tick)
        # 2. each slider alone at -s and +s on the first effect_count seeds (on the toy: max(effect_count, factor_seeds))
        minus, plus = signed_images(model, sset, indices, signed_seeds, cfg.effect_strength,
                                    batch_size=cfg.batch_size, progress=tick, mod=mod)
        rand = None
        if cfg.random_baseline:  # the same strengths on random rank-1 directions with the sliders' norms
            randomise(mod, sset.name)
            rand = draw(model, mod, sset.prompt, seeds, weights, steps, guidance, cfg.batch_size, tick)
    finally:
        mod.remove()
    factor_images = None
    if toy:  # random directions, prompt edits and the base's noise floor on the same seeds (`evaluate.toy_factors`)

        f = cfg.factor_seeds
        factor_images = toy_factors.draw(model, sset, indices, signed_seeds[:f], cfg.effect_strength,
                                            list(range(cfg.seed, cfg.seed + 2 * f)), batch_size=cfg.batch_size,
                                            progress=tick, sliders=(minus[:, :f], plus[:, :f]))
    minus, plus = minus[:, :cfg.effect_count], plus[:, :cfg.effect_count]
    taught = draw(teacher, None, sset.prompt, seeds, None, teacher.default_steps, teacher.default_guidance, cfg.batch_size, tick) \
        if teacher is not None else None
    # 3. embed; Fréchet distance between the two sets
    emb = evaluation.embed(encoder, base, slid, progress=(lambda d, t: progress("embedding", d, t)) if progress else None)
    eff = evaluation.embed(encoder, torch.cat([minus.flatten(0, 1), plus.flatten(0, 1)]))
    d = emb.a.shape[1]
    eff_minus = eff.a[: k * cfg.effect_count].reshape(k, cfg.effect_count, d)
    eff_plus = eff.a[k * cfg.effect_count:].reshape(k, cfg.effect_count, d)
    # 4. the numbers, from the embeddings only
    base_emb = emb.a[: cfg.effect_count]
    per_slider = [{"index": s.index, "label": s.label, "effect_size": metrics.effect_size(base_emb, eff_plus[j]),
                   "effect_size_minus": metrics.effect_size(base_emb, eff_minus[j])} for j, s in enumerate(sset.sliders)]
    cosines = metrics.effect_cosines(eff_plus - base_emb[None]) if k > 0 else np.zeros((0, 0))
    doc: dict[str, Any] = {
        "what": "sliders", "set": sset.name, "prompt": sset.prompt, "model": model.identity(), "encoder": encoder_spec,
        "steps": steps, "guidance": guidance, "seeds": [seeds[0], seeds[-1]], **{f: getattr(cfg, f) for f in
                                                                                 ("count", "per_image", "scale", "effect_count", "effect_strength", "factor_seeds", "seed")},
        "strength_range": [-cfg.scale, cfg.scale],
        "base": evaluation.set_scores(emb.a, text), "sliders": evaluation.set_scores(emb.b, text),
        "frechet_distance": emb.frechet, "clip_available": text is not None, "clip_note": clip_note,
        "per_slider": per_slider, "effect_cosines": cosines.tolist(),
        "mean_abs_off_diagonal_cosine": float(np.abs(cosines[~np.eye(k, dtype=bool)]).mean()) if k > 1 else None,
    }
    b, s = doc["base"], doc["sliders"]
    doc["diversity_ratio"] = s["diversity"] / b["diversity"] if b["diversity"] > 0 else None
    doc["vendi_ratio"] = s["vendi"] / b["vendi"]
    doc["clip_score_change"] = (s["clip_score"] / b["clip_score"] - 1.0) if text is not None and b["clip_score"] else None
    doc.update(intervals(emb.a, emb.b, text, cfg.seed))
    doc["random_baseline"] = None
    if rand is not None:
        remb = evaluation.embed(encoder, rand).a
        r = evaluation.set_scores(remb, text)
        doc["random_baseline"] = {"set": r, "diversity_ratio": r["diversity"] / b["diversity"] if b["diversity"] > 0 else None,
                                  "vendi_ratio": r["vendi"] / b["vendi"],
                                  "clip_score_change": (r["clip_score"] / b["clip_score"] - 1.0) if text is not None and b["clip_score"] else None,
                                  **{n: v for n, v in intervals(emb.a, remb, text, cfg.seed).items() if n.endswith("_ci") or n == "diversity_higher"}}
    doc["teacher"] = None
    if taught is not None:
        ref = evaluation.embed(encoder, taught).a
        half = len(ref) // 2
        doc["teacher"] = {"model": teacher.identity(), "steps": teacher.default_steps, "guidance": teacher.default_guidance,
                          "frechet_distance": {"base": metrics.frechet_distance(emb.a, ref), "sliders": metrics.frechet_distance(emb.b, ref),
                                               "floor": metrics.frechet_distance(ref[:half], ref[half:]),
                                               **({"random_baseline": metrics.frechet_distance(remb, ref)} if rand is not None else {})},
                          "set": evaluation.set_scores(ref, text)}
    arrays = {"base_embeddings": emb.a, "slider_embeddings": emb.b, "slider_weights": weights,
              "effect_minus_embeddings": eff_minus, "effect_plus_embeddings": eff_plus, "text_embedding": text,
              # images: all of them on the toy (32x32; the factor table is read from them), else previews for the report
              "base_images": _images(base, toy), "slider_images": _images(slid, toy),
              "effect_minus_images": np.stack([_images(m, toy, 3) for m in minus]),
              "effect_plus_images": np.stack([_images(p, toy, 3) for p in plus]),
              **({"teacher_embeddings": ref, "teacher_images": _images(taught, toy)} if taught is not None else {}),
              **({"random_embeddings": remb, "random_images": _images(rand, toy)} if rand is not None else {})}
    # 5. on the toy: which factor each slider moves
    doc["factors"] = doc["factor_entropy"] = doc["factor_table"] = None
    if toy:

        arrays.update(factor_images.arrays())
        doc["factor_table"] = toy_factors.table(factor_images, indices, [s.label for s in sset.sliders], seed=cfg.seed)
        doc["factors"] = doc["factor_table"]["rows"]["sliders"]["per_seed"]  # the per-seed table, as before
        doc["factor_entropy"] = {"base": factors.entropy(arrays["base_images"]), "sliders": factors.entropy(arrays["slider_images"]),
                                 **({"teacher": factors.entropy(arrays["teacher_images"])} if taught is not None else {}),
                                 **({"random_baseline": factors.entropy(arrays["random_images"])} if rand is not None else {})}
    doc = evaluation.save_evaluation(key, doc, {n: a for n, a in arrays.items() if a is not None}, on_wait=on_wait)
    return evaluation.public(doc, False, time.perf_counter() - started)


def _images(images: torch.Tensor, full: bool, n: int = 32) -> np.ndarray:
    """uint8 (n, H, W, 3): every image when `full`, else a preview of the first n."""
    return evaluation.to_uint8(images) if full else evaluation.preview(images, n)
