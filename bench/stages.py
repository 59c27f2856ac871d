"""Where a toy slider set loses purity, stage by stage, each against its own ceiling.

    python bench/sliders.py stages --set a-shape [--scenes 4000] [--images FACTORS.npz] [--pca-samples 16,64] [--sweep]

1. PCA: the factor subspaces of the encoder's space, from the world generator's labelled scenes
   (value-mean differences of each factor, `toy.subspaces`), against the top-K PCA directions of
   the set (and of variants of its harvest: more trajectories, `--x0 final`, only the steps inside
   the slider window, whitened); ceiling: PCA of the clean rendered scenes themselves.
2. Training: each slider's alignment (cosine of its measured shift with its direction, from the
   set's manifest); ceiling 1. `--sweep` trains the set again with one training setting changed
   at a time (`SWEEP`) and reports each run's alignment.
3. Images: with `--images` (`bench/sliders.py factors --out`), the mean embedding shift between
   +s and -s of each slider's images and of each prompt edit, decomposed the same way, beside the
   analyser's distribution purity; the prompt edits are the model's ceiling.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

GROUP_KEYS = {"colour": ("colour",), "shape": ("shape",), "size": ("size",), "position": ("horizontal", "vertical"),
              "background": ("background",)}
CORE = ("colour", "shape", "size", "position")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def factor_bases(encoder, n_scenes: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per factor group an orthonormal basis of its value-mean differences in the encoder's space; and the scenes' embeddings."""
    from conceptkit.toy import FACTORS, factor_indices, render, sample_scenes
    from conceptkit.toy.subspaces import mean_difference_basis, orthonormal

    scenes = sample_scenes(n_scenes, seed)
    imgs = torch.from_numpy(render(scenes)).permute(0, 3, 1, 2).float() / 255.0
    emb = encoder.embed(imgs).numpy().astype(np.float64)
    idx = factor_indices(scenes)
    raw = {f: mean_difference_basis(emb, idx[:, j]) for j, f in enumerate(FACTORS)}
    return {g: orthonormal(np.concatenate([raw[k] for k in keys])) for g, keys in GROUP_KEYS.items()}, emb


def describe(directions: np.ndarray, bases: dict[str, np.ndarray]) -> dict:
    """How a (K, d) set of directions lines up with the factor subspaces."""
    from conceptkit.toy.subspaces import captured, composition, decomposition, orthonormal, principal_cosines

    core = orthonormal(np.concatenate([bases[g] for g in CORE]))
    every = orthonormal(np.concatenate(list(bases.values())))
    comp = decomposition(directions, list(bases.values()))  # the spans overlap in the encoder's space
    inside = composition(directions, [every])[:, 0]
    names = list(bases)
    rows = []
    for k in range(len(directions)):
        shares = comp[k]
        rows.append({"main": names[int(np.argmax(shares))], "purity": float(shares.max() / max(shares.sum(), 1e-12)),
                     "in_factor_span": float(inside[k]), "shares": {g: round(float(v), 3) for g, v in zip(names, shares)}})
    cos = principal_cosines(directions, core)
    return {"principal_cosines_core": [round(float(c), 3) for c in cos],
            "mean_cos2_core": float((cos ** 2).mean()) if len(cos) else 0.0,
            "mean_cos2_all": float((principal_cosines(directions, every) ** 2).mean()),
            "captured": {g: round(captured(b, directions), 3) for g, b in bases.items()},
            "mean_purity": float(np.mean([r["purity"] for r in rows])),
            "mean_in_factor_span": float(np.mean(inside)), "mean_norm": float(np.linalg.norm(directions, axis=1).mean()), "mains": [r["main"] for r in rows], "per_direction": rows}


def ceiling_by_samples(encoder, bases: dict[str, np.ndarray], k: int, sizes=(16, 64, 256, 1024), draws: int = 5) -> dict[int, float]:
    """Mean purity of the top-k PCA directions of n rendered scenes (fresh draws), per n: PCA's ceiling at n samples."""
    from conceptkit.sliders.train import principal_directions

    out = {}
    for n in sizes:
        vals = [describe(principal_directions(factor_bases(encoder, n, seed=100 + r)[1], k).components, bases)["mean_purity"]
                for r in range(draws)]
        out[n] = float(np.mean(vals))
    return out


def subspace_overlap(bases: dict[str, np.ndarray], emb: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """The largest principal cosine between every two factor subspaces; each subspace's share of the embeddings' variance."""
    from conceptkit.toy.subspaces import principal_cosines

    names = list(bases)
    overlap = {f"{a}/{b}": float(principal_cosines(bases[a], bases[b]).max(initial=0.0))
               for i, a in enumerate(names) for b in names[i + 1:]}
    x = emb - emb.mean(0)
    total = float((x ** 2).sum())
    return overlap, {g: float(((x @ b.T) ** 2).sum() / total) for g, b in bases.items()}


def pca_variants(model, sset, encoder, k: int, samples: list[int]) -> dict[str, np.ndarray]:
    """Top-k PCA directions of the set's harvest and of variants of it: more trajectories, final x0, window only, ICA."""
    from conceptkit import harvest
    from conceptkit.diffusion import decode_batched
    from conceptkit.diffusion import window_steps
    from conceptkit.sliders.train import principal_directions

    st = sset.manifest["settings"]
    out = {}
    for n in samples:
        hcfg = harvest.HarvestConfig(prompts=(sset.prompt,), samples=n, steps=st["steps"], guidance=st["guidance"],
                                     seed=st["seed"], record=("x0", "xt"))
        h = harvest.load_harvest(harvest.run(model, hcfg).path, samples=n)
        steps = h.x0.shape[1]
        emb = encoder.embed(decode_batched(model, h.x0.flatten(0, 1).float())).numpy().reshape(n, steps, -1)
        first = window_steps(steps, float(sset.manifest.get("start", 0.1)))
        out[f"all x0, {n} trajectories"] = principal_directions(emb.reshape(n * steps, -1), k).components
        out[f"final x0, {n} trajectories"] = principal_directions(emb[:, -1], min(k, n - 1)).components
        out[f"ICA of final x0, {n} trajectories"] = principal_directions(emb[:, -1], min(k, n - 1), method="ica").components
        out[f"ICA of all x0, {n} trajectories"] = principal_directions(emb.reshape(n * steps, -1), k, method="ica").components
        out[f"x0 from step {first}, {n} trajectories"] = principal_directions(emb[:, first:].reshape(-1, emb.shape[-1]), k).components
        late = steps // 2
        out[f"x0 from step {late}, {n} trajectories"] = principal_directions(emb[:, late:].reshape(-1, emb.shape[-1]), k).components
    return out


def edit_steps(model, sset, encoder, bases: dict[str, np.ndarray], every: int = 2) -> dict[str, list[dict]]:
    """The model's ceiling step by step: the one-step x0 shift each prompt edit makes at (x_t, t) of the set's harvest.

    For every `every`-th denoising step, the x0 predicted from the harvested x_t with the +s prompt minus
    the one with the -s prompt, embedded, averaged over the trajectories and split into factor parts. A
    factor whose part falls to zero after some step can no longer be moved there by anything that acts on
    the conditioning, a slider included: training pairs from those steps teach it nothing about that factor.
    """
    from conceptkit import harvest
    from conceptkit.diffusion import decode
    from conceptkit.sliders.train import encode_conditioning, predict_x0
    from conceptkit.toy.edits import EDITS
    from conceptkit.toy.subspaces import decomposition
    from conceptkit.toy.world import prompt as toy_prompt

    st = sset.manifest["settings"]
    guidance, size = float(sset.manifest["guidance"]), (int(sset.manifest["height"]), int(sset.manifest["width"]))
    hcfg = harvest.HarvestConfig(prompts=(sset.prompt,), samples=st["samples"], steps=st["steps"], guidance=st["guidance"],
                                 seed=st["seed"], record=("x0", "xt"))
    h = harvest.load_harvest(harvest.run(model, hcfg).path, samples=st["samples"])
    names = list(bases)
    out = {}
    for factor, lo, hi in EDITS:
        conds = [encode_conditioning(model, [toy_prompt(**{factor: v})], guidance, size) for v in (lo, hi)]
        rows = []
        for j in range(0, h.xt.shape[1], every):
            xt = h.xt[:, j].float()
            t = h.timesteps[j].repeat(len(xt))
            idx = torch.zeros(len(xt), dtype=torch.long)
            with torch.no_grad():
                e = [encoder.embed(decode(model, predict_x0(model, xt, t, c, idx, guidance))).numpy() for c in conds]
            d = (e[1] - e[0]).mean(0).astype(np.float64)
            parts = decomposition(d[None], list(bases.values()))[0]
            rows.append({"step": j, "norm": round(float(np.linalg.norm(d)), 3),
                         "parts": {g: round(float(v), 3) for g, v in zip(names, parts)}})
        out[f"{lo}/{hi}"] = rows
    return out


def image_shifts(npz: Path, encoder) -> dict[str, np.ndarray]:
    """(S, d) mean embedding shift phi(+s) - phi(-s) of each row of a `factors --out` file."""
    arr = np.load(npz)
    out = {}
    for row, (lo, hi) in {"sliders": ("slider_minus", "slider_plus"), "random": ("random_minus", "random_plus"),
                          "prompt_edits": ("edit_minus", "edit_plus")}.items():
        m, p = arr[f"factor_{lo}_images"], arr[f"factor_{hi}_images"]

        def emb(x):
            t = torch.from_numpy(x.reshape(-1, *x.shape[2:])).permute(0, 3, 1, 2).float() / 255.0
            return encoder.embed(t).numpy().reshape(x.shape[0], x.shape[1], -1).astype(np.float64)

        out[row] = (emb(p) - emb(m)).mean(1)
    return out


# One knob at a time from the set's own settings (train steps, pairs, learning rate, strength, window start).
SWEEP = (("steps", 50), ("steps", 200), ("steps", 400), ("pairs", 4), ("lr", 2e-3), ("lr", 1e-2), ("strength", 2.0),
         ("start", 0.3))


def config_from(sset, name: str, **train):
    """The set's SlidersConfig with `train` settings replaced, under another name."""
    from dataclasses import replace

    from conceptkit.sliders.train import TrainSettings
    from conceptkit.sliders.pipeline import SlidersConfig

    st = dict(sset.manifest["settings"])
    t = replace(TrainSettings(**st.pop("train")), **train)
    st.pop("name", None)
    return SlidersConfig(**{**st, "train": t, "name": name, "overwrite": True})


def sweep(model, sset, knobs=SWEEP) -> list[dict]:
    """Train the set again with one training setting changed at a time; each run's alignment and seconds."""
    import time

    from conceptkit.sliders.pipeline import run as train_set

    out = []
    for knob, value in (("default", None), *knobs):
        cfg = config_from(sset, f"sweep-{knob}-{value}".replace(".", "p"), **({} if value is None else {knob: value}))
        t0 = time.perf_counter()
        done = train_set(model, cfg)
        al = [s.alignment for s in done.sliders]
        out.append({"knob": knob, "value": value, "name": done.name, "seconds": round(time.perf_counter() - t0, 1),
                    "mean_alignment": float(np.mean(al)), "alignment": [round(x, 3) for x in al],
                    "labels": [s.label for s in done.sliders]})
        log(f"  sweep {knob}={value}: mean alignment {out[-1]['mean_alignment']:.3f} {out[-1]['alignment']} "
            f"({out[-1]['seconds']} s) labels {out[-1]['labels']}")
    return out


def run(a) -> dict:
    from conceptkit.features import load_encoder
    from conceptkit.models.load import load_model
    from conceptkit.sliders.sets import load_set
    from conceptkit.sliders.train import principal_directions
    from conceptkit.sliders.labels import alignment

    sset = load_set(a.set)
    model = load_model(sset.manifest["model"]["spec"], device="cpu")
    encoder = load_encoder(sset.manifest["encoder"], model.spec)
    directions = np.asarray(sset.manifest["directions"], np.float64)
    k = len(directions)
    # 1. PCA against the factor subspaces, and its ceiling
    bases, world = factor_bases(encoder, a.scenes)
    log("  factor subspace dimensions: " + ", ".join(f"{g} {len(b)}" for g, b in bases.items()))
    pca = {"set (as trained)": describe(directions, bases),
           "ceiling: PCA of rendered scenes": describe(principal_directions(world, k).components, bases),
           "ceiling: ICA of rendered scenes": describe(principal_directions(world, k, method="ica").components, bases)}
    for name, d in pca_variants(model, sset, encoder, k, [int(x) for x in a.pca_samples.split(",")]).items():
        pca[name] = describe(d, bases)
    by_samples = ceiling_by_samples(encoder, bases, k)
    log("  PCA ceiling by samples (rendered scenes, mean purity of 5 draws): "
        + ", ".join(f"{n}: {v:.3f}" for n, v in by_samples.items()))
    overlap, variance = subspace_overlap(bases, world)
    log("  largest principal cosine between factor subspaces: " + ", ".join(f"{p} {c:.2f}" for p, c in overlap.items()))
    log("  share of the rendered scenes' embedding variance in each subspace: "
        + ", ".join(f"{g} {v:.3f}" for g, v in variance.items()))
    for name, d in pca.items():
        log(f"  PCA {name:<34} mean cos^2 with core {d['mean_cos2_core']:.3f} (cos {d['principal_cosines_core']}), "
            f"purity {d['mean_purity']:.3f}, in span {d['mean_in_factor_span']:.3f}, mains {d['mains']}, captured {d['captured']}")
    doc = {"what": "stages", "set": sset.name, "settings": sset.manifest["settings"],
           "factor_dims": {g: len(b) for g, b in bases.items()}, "subspace_overlap": overlap, "variance_share": variance,
           "pca": pca, "pca_ceiling_by_samples": by_samples,
           "training": {"alignment": [round(s.alignment, 3) for s in sset.sliders], "labels": [s.label for s in sset.sliders],
                        "mean_alignment": float(np.mean([s.alignment for s in sset.sliders]))}}
    log(f"  training: alignment {doc['training']['alignment']} (mean {doc['training']['mean_alignment']:.3f}, ceiling 1)")
    doc["edit_steps"] = edit_steps(model, sset, encoder, bases)
    for edit, rows in doc["edit_steps"].items():
        log(f"  one-step edit shift {edit:<12} " + "  ".join(
            f"s{r['step']} {r['norm']:.2f} ({max(r['parts'], key=r['parts'].get)[:3]} {max(r['parts'].values()):.2f})" for r in rows))
    if a.sweep:
        doc["training"]["sweep"] = sweep(model, sset)
    # 3. the images: the embedding shift the sliders make, and the prompt edits' (the model's ceiling)
    if a.images is not None:
        shifts = image_shifts(a.images, encoder)
        doc["images"] = {row: describe(s, bases) for row, s in shifts.items()}
        doc["images"]["sliders"]["alignment_with_direction"] = [round(float(c), 3) for c in alignment(shifts["sliders"], directions[: len(shifts["sliders"])])]
        for row, d in doc["images"].items():
            log(f"  image shift {row:<13} norm {d['mean_norm']:.3f}, purity {d['mean_purity']:.3f}, in span {d['mean_in_factor_span']:.3f}, mains {d['mains']}, "
                f"shares {[r['shares'] for r in d['per_direction']]}")
        log(f"  image shift alignment with the direction: {doc['images']['sliders']['alignment_with_direction']}")
    return doc
