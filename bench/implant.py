"""`conceptkit implant` on the toy, against its two references in one run.

Usage: python bench/implant.py [--steps 300] [--seeds 64] [--images 12] [--temporal 1,2,3,4] [--xti] [--no-composition]
                               [--threads 1] [--out FILE.json] [--grid FILE.png]

Two concepts, each learned from `--images` images drawn by the toy world's renderer:
- composition: red diamonds (every size, position, background) under the new word "<thing>",
  started from "shape". The analyser reads every factor, so reconstruction is the share of
  "a <thing>" images read as red diamonds, against the init word alone ("a shape": the baseline
  that should lose) and the prompt that names it ("a red diamond": the ceiling); editability is
  the share of "a <thing> at the top left" / "on a white background" / "a large <thing>" images
  whose named factor is read as asked, with the concept kept.
- unseen colours, each under its own new word, learned from shapes of every kind, size, position
  and background in that colour: amber (RGB 243, 175, 10; between the toy's orange and yellow),
  started from "orange"; violet (188, 85, 195; between purple and pink), from "purple"; and brown
  (RGB 139, 69, 19; far from every colour the toy knows), from "orange". The analyser names only the toy's eight colours, and the toy CLIP was trained on
  them too, so the measure of the method is pixel-level: the mean foreground colour's distance to
  the concept's colour (RGB, 0-441), beside the toy CLIP's image similarity to the references.
  Against: the init word, the known colour words nearest to it (the best prompt of known words),
  and the mean of those words' vectors (an untrained mix of known words). Editability: the
  analyser (colour tolerance off: it cannot name the colour) reads the named position, background
  or size of "a <token> at the top left" etc., and the foreground distance of those images.
- with --temporal and --xti, amber is also learned with those methods (the same measures for the word).
- an unseen shape: apex-down triangles (the toy only drew them apex up) under "<down>", started from
  "triangle". An image holds an apex-down triangle when the analyser reads a triangle in it
  upside down.
Captions during training are "a <token>" (the toy knows only its own words).
Prints one JSON document (the numbers in docs/implant.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _folder(images: np.ndarray) -> str:
    from PIL import Image

    folder = tempfile.mkdtemp(prefix="ck-implant-")
    for i, im in enumerate(images):
        Image.fromarray(im).save(os.path.join(folder, f"{i:02d}.png"))
    return folder


def _draw(model, prompt: str, seeds: list[int]) -> np.ndarray:
    from conceptkit.diffusion import sample
    from conceptkit.evaluate.common import to_uint8

    return np.concatenate([to_uint8(sample(model, prompt, seeds[i:i + 32], model.default_steps, model.default_guidance))
                           for i in range(0, len(seeds), 32)])


def _share(images: np.ndarray, want: dict[str, str]) -> float:
    from conceptkit.toy import analyse_batch

    readings = analyse_batch(images)
    return float(np.mean([r.valid and all(r.factors[k] == v for k, v in want.items()) for r in readings]))


def _similarity(encoder, images: np.ndarray, refs: np.ndarray) -> float:
    import torch

    a = encoder.embed(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    b = encoder.embed(torch.from_numpy(refs).permute(0, 3, 1, 2).float() / 255)
    return float((a @ b.T).mean())


def _readings(images: np.ndarray, colour_blind: bool = False):
    from conceptkit.toy import analyse_batch
    from conceptkit.toy.analyse import AnalyserConfig

    return analyse_batch(images, AnalyserConfig(colour_tol=442.0) if colour_blind else AnalyserConfig())


def _apex_down(images: np.ndarray) -> float:
    """Share of images the analyser reads, turned upside down, as a triangle: an apex-down triangle."""
    return float(np.mean([r.valid and r.factors["shape"] == "triangle" for r in _readings(images[:, ::-1].copy(), colour_blind=True)]))


def _shapes(images: np.ndarray) -> dict:
    """What the analyser reads (colour aside): the share of clean one-shape images and of the commonest shape among them."""
    reads = [r for r in _readings(images, colour_blind=True) if r.valid]
    counts = {s: sum(r.factors["shape"] == s for r in reads) for s in ("circle", "square", "triangle", "diamond")}
    return {"valid": len(reads) / len(images), "commonest_shape_share": max(counts.values()) / max(len(reads), 1)}


def _mix(words: list[str]):
    """A toy that knows "<mix>": the mean of the known words' vectors, untrained."""
    import torch
    from safetensors.torch import save_file

    from conceptkit.implant.token import init_vector
    from conceptkit.models.load import load_model
    from conceptkit.models.textual_inversion import add_embedding

    model = load_model("toy")
    path = os.path.join(tempfile.mkdtemp(prefix="ck-mix-"), "mix.safetensors")
    save_file({"emb_params": torch.stack([init_vector(model, w) for w in words]).mean(0)[None].contiguous()}, path)
    return add_embedding(model, path, "<mix>")


EDIT_PHRASES = {"top left": ("a {} at the top left", {"horizontal": "left", "vertical": "top"}),
                "white background": ("a {} on a white background", {"background": "white"}),
                "large": ("a large {}", {"size": "large"})}


def _unseen_colour(name: str, rgb: tuple[int, int, int], init: str, known: list[str], scenes, seeds, steps: int, encoder,
                   edit_row: bool = True) -> tuple[dict, list]:
    """One unseen colour learned as "<name>": reconstruction and editability against known words (see the module doc)."""
    from conceptkit.implant.pipeline import ImplantConfig, run
    from conceptkit.models.load import load_model
    from conceptkit.toy.world import render

    refs = render(scenes, foreground=rgb)
    t0 = time.perf_counter()
    res = run(load_model("toy"), ImplantConfig(images=_folder(refs), token=f"<{name}>", init_word=init, steps=steps))
    train_s = round(time.perf_counter() - t0, 1)
    m, mix = res.model, _mix(known)
    drawn = {f"<{name}> (learned)": _draw(m, f"a <{name}>", seeds)}
    for w in dict.fromkeys([init, *known]):
        drawn[f"'{w}' (known word)"] = _draw(m, f"{'an' if w[0] in 'aeiou' else 'a'} {w} shape", seeds)
    drawn[f"mean of {' and '.join(known)} vectors (untrained)"] = _draw(mix, "a <mix>", seeds)
    out = {"rgb": list(rgb), "init_word": init, "known_words": known, "train_seconds": train_s, "loss": res.manifest["loss"],
           "foreground_distance": {"references": _foreground_distance(refs, rgb), **{k: _foreground_distance(v, rgb) for k, v in drawn.items()}},
           "foreground_distance_se": {k: _foreground_se(v, rgb) for k, v in drawn.items()},
           "toy_clip_similarity_to_references": {"references themselves": _similarity(encoder, refs, refs),
                                                 **{k: _similarity(encoder, v, refs) for k, v in drawn.items()}},
           "shapes_read": {"references": _shapes(refs), **{k: _shapes(v) for k, v in drawn.items()}}}
    best = min(known, key=lambda w: out["foreground_distance"][f"'{w}' (known word)"])
    out["best_known_word"] = best
    learned, edit_images = _edits(m, f"<{name}>", rgb, seeds)
    known_word, _ = _edits(m, f"{best} shape", rgb, seeds)
    out["editability"] = {label: {f"<{name}>": learned[label], best: known_word[label]} for label in EDIT_PHRASES}
    return out, [refs[:8], drawn[f"<{name}> (learned)"][:8], drawn[f"'{best}' (known word)"][:8], *([edit_images[:8]] if edit_row else [])]


def _edits(model, word: str, rgb, seeds) -> tuple[dict, np.ndarray]:
    """Per edit of `EDIT_PHRASES`: the share of images the analyser (colour aside) reads as asked, and their
    foreground distance to `rgb`; and the "top left" images."""
    out, top_left = {}, None
    for label, (phrase, want) in EDIT_PHRASES.items():
        images = _draw(model, phrase.format(word), seeds)
        reads = _readings(images, colour_blind=True)
        out[label] = {"read_as_asked": float(np.mean([r.valid and all(r.factors[k] == v for k, v in want.items()) for r in reads])),
                      "foreground_distance": _foreground_distance(images, rgb)}
        top_left = images if top_left is None else top_left
    return out, top_left


def _colour_method(name: str, rgb, init: str, scenes, seeds, steps: int, encoder, method: str, d: int) -> dict:
    """An unseen colour learned with `method` (temporal at D = d, or xti): the measures of `_unseen_colour` for the word."""
    from conceptkit.implant.pipeline import ImplantConfig, run
    from conceptkit.models.load import load_model
    from conceptkit.toy.world import render

    refs = render(scenes, foreground=rgb)
    t0 = time.perf_counter()
    m = run(load_model("toy"), ImplantConfig(images=_folder(refs), token=f"<{name}>", init_word=init, steps=steps,
                                             method=method, temporal_dim=d)).model
    train_s = round(time.perf_counter() - t0, 1)
    images = _draw(m, f"a <{name}>", seeds)
    return {"train_seconds": train_s, "foreground_distance": _foreground_distance(images, rgb), "foreground_distance_se": _foreground_se(images, rgb),
            "toy_clip_similarity_to_references": _similarity(encoder, images, refs), "shapes_read": _shapes(images),
            "editability": _edits(m, f"<{name}>", rgb, seeds)[0]}


def _foreground_se(images: np.ndarray, rgb: tuple[int, int, int]) -> float:
    """The standard error of `_foreground_distance` over the images."""
    d = _foreground_distances(images, rgb)
    return float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0


def _foreground_distance(images: np.ndarray, rgb: tuple[int, int, int]) -> float:
    return float(np.mean(_foreground_distances(images, rgb)))


def _foreground_distances(images: np.ndarray, rgb: tuple[int, int, int]) -> list[float]:
    """Per image, the distance (0-255 RGB) between the colour farthest from the border's and `rgb`."""
    out = []
    for im in images.astype(np.float32):
        border = np.median(np.concatenate([im[0], im[-1], im[:, 0], im[:, -1]]), axis=0)
        far = np.linalg.norm(im - border, axis=-1)
        fg = im[far >= 0.5 * far.max()].mean(0) if far.max() > 20 else border
        out.append(float(np.linalg.norm(fg - np.array(rgb, np.float32))))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=64)
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--temporal", default="", help="also learn the composition and amber with --method temporal at these D, e.g. 1,2,3,4")
    p.add_argument("--xti", action="store_true", help="also learn the composition and amber with --method xti")
    p.add_argument("--no-composition", action="store_true", help="skip the red-diamond composition (and --temporal, --xti)")
    p.add_argument("--grid", default=None, help="write a PNG: per concept, references, the learned word, the init word or best known word, an edit (8 each)")
    a = p.parse_args(argv)
    os.environ.setdefault("CONCEPTKIT_HOME", tempfile.mkdtemp(prefix="ck-bench-"))
    import torch

    torch.set_num_threads(a.threads)
    from conceptkit.features import load_encoder
    from conceptkit.implant.pipeline import ImplantConfig, run
    from conceptkit.models.load import load_model
    from conceptkit.toy.world import render, sample_scenes

    started = time.perf_counter()
    seeds = list(range(1000, 1000 + a.seeds))
    scenes = sample_scenes(a.images, seed=7)
    out: dict = {"steps": a.steps, "seeds": a.seeds, "images": a.images, "threads": a.threads}
    rows_img: list = []
    if not a.no_composition:
        # 1. a composition under a new word: every factor readable
        refs = render([dataclasses.replace(s, shape="diamond", colour="red") for s in scenes])
        model = load_model("toy")
        t0 = time.perf_counter()
        res = run(model, ImplantConfig(images=_folder(refs), token="<thing>", init_word="shape", steps=a.steps))
        m = res.model
        concept = {"shape": "diamond", "colour": "red"}
        rows = {"<thing> (learned)": "a <thing>", "init word (baseline)": "a shape", "named prompt (ceiling)": "a red diamond"}
        rows_img += [refs[:8], _draw(m, "a <thing>", seeds[:8]), _draw(m, "a shape", seeds[:8]), _draw(m, "a <thing> at the top left", seeds[:8])]
        out["composition"] = {"train_seconds": round(time.perf_counter() - t0, 1), "loss": res.manifest["loss"],
                              "reconstruction": {k: _share(_draw(m, p, seeds), concept) for k, p in rows.items()}}
        edits = {"top left": ("a <thing> at the top left", "a red diamond at the top left", {"horizontal": "left", "vertical": "top"}),
                 "white background": ("a <thing> on a white background", "a red diamond on a white background", {"background": "white"}),
                 "large": ("a large <thing>", "a large red diamond", {"size": "large"})}
        out["composition"]["editability"] = {
            name: {"learned": _share(_draw(m, p, seeds), {**want, **concept}), "ceiling": _share(_draw(m, q, seeds), {**want, **concept})}
            for name, (p, q, want) in edits.items()}
        # 1b. the temporal extension at each D (Picasso's ablation of the prompt space in time)
        for d in [int(x) for x in a.temporal.split(",") if x]:
            model = load_model("toy")
            t0 = time.perf_counter()
            res = run(model, ImplantConfig(images=_folder(refs), token="<thing>", init_word="shape", steps=a.steps,
                                           method="temporal", temporal_dim=d))
            m = res.model
            out.setdefault("temporal", {})[str(d)] = {
                "train_seconds": round(time.perf_counter() - t0, 1), "reconstruction": _share(_draw(m, "a <thing>", seeds), concept),
                "editability": {name: _share(_draw(m, p, seeds), {**want, **concept}) for name, (p, _, want) in edits.items()}}
        if a.xti:
            model = load_model("toy")
            t0 = time.perf_counter()
            m = run(model, ImplantConfig(images=_folder(refs), token="<thing>", init_word="shape", steps=a.steps, method="xti")).model
            out["xti"] = {"train_seconds": round(time.perf_counter() - t0, 1), "reconstruction": _share(_draw(m, "a <thing>", seeds), concept),
                          "editability": {name: _share(_draw(m, p, seeds), {**want, **concept}) for name, (p, _, want) in edits.items()}}
    # 2. colours the toy never drew: one between two it knows, one far from all
    encoder = load_encoder("toy", "toy")
    out["unseen_colour"] = {}
    for name, rgb, init, known in (("amber", (243, 175, 10), "orange", ["orange", "yellow"]),
                                   ("violet", (188, 85, 195), "purple", ["purple", "pink"]),
                                   ("brown", (139, 69, 19), "orange", ["orange", "red"])):
        out["unseen_colour"][name], rows = _unseen_colour(name, rgb, init, known, scenes, seeds, a.steps, encoder, edit_row=name == "amber")
        rows_img += rows if name != "violet" else []
    # 2b. amber, the unseen colour the toy can draw, with the temporal extension at each D and with xti
    for method, d in [("temporal", int(x)) for x in a.temporal.split(",") if x] + ([("xti", 1)] if a.xti else []):
        out.setdefault("amber_methods", {})[f"temporal {d}" if method == "temporal" else "xti"] = _colour_method(
            "amber", (243, 175, 10), "orange", scenes, seeds, a.steps, encoder, method, d)
    # 3. a shape the toy never drew: apex-down triangles
    refs = render([dataclasses.replace(s, shape="triangle") for s in scenes])[:, ::-1].copy()  # the flip mirrors the position too
    t0 = time.perf_counter()
    m = run(load_model("toy"), ImplantConfig(images=_folder(refs), token="<down>", init_word="triangle", steps=a.steps)).model
    learned = _draw(m, "a <down>", seeds)
    out["unseen_shape"] = {"train_seconds": round(time.perf_counter() - t0, 1),
                           "apex_down_share": {"references": _apex_down(refs), "<down> (learned)": _apex_down(learned),
                                               "'triangle' (init word)": _apex_down(_draw(m, "a triangle", seeds))}}
    rows_img += [refs[:8], learned[:8]]
    if a.grid:
        from PIL import Image

        from conceptkit.figures import grid_image

        cells = torch.from_numpy(np.concatenate(rows_img)).permute(0, 3, 1, 2).float() / 255
        cells = torch.nn.functional.interpolate(cells, scale_factor=2, mode="nearest")
        grid = grid_image(cells, len(rows_img), 8)
        Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(a.grid)
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")
    print(f"done in {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
