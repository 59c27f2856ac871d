"""`conceptkit implant` on the toy, against its two references in one run.

Usage: python bench/implant.py [--steps 300] [--seeds 64] [--images 12] [--temporal 1,2,3,4] [--xti] [--threads 1] [--out FILE.json] [--grid FILE.png]

Two concepts, each learned from `--images` images drawn by the toy world's renderer:
- composition: red diamonds (every size, position, background) under the new word "<thing>",
  started from "shape". The analyser reads every factor, so reconstruction is the share of
  "a <thing>" images read as red diamonds, against the init word alone ("a shape": the baseline
  that should lose) and the prompt that names it ("a red diamond": the ceiling); editability is
  the share of "a <thing> at the top left" / "on a white background" / "a large <thing>" images
  whose named factor is read as asked, with the concept kept.
- unseen colour: brown shapes (RGB 139, 69, 19; the toy was trained on 8 other colours) under
  "<brown>", started from "orange". The analyser cannot name brown, so reconstruction is the toy
  CLIP's image similarity to the references and the mean foreground colour's distance to brown,
  against "an orange shape".
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


def _foreground_distance(images: np.ndarray, rgb: tuple[int, int, int]) -> float:
    """Mean over images of the distance (0-255 RGB) between the colour farthest from the border's and `rgb`."""
    out = []
    for im in images.astype(np.float32):
        border = np.median(np.concatenate([im[0], im[-1], im[:, 0], im[:, -1]]), axis=0)
        far = np.linalg.norm(im - border, axis=-1)
        fg = im[far >= 0.5 * far.max()].mean(0) if far.max() > 20 else border
        out.append(float(np.linalg.norm(fg - np.array(rgb, np.float32))))
    return float(np.mean(out))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=64)
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--temporal", default="", help="also learn the composition with --method temporal at these D, e.g. 1,2,3,4")
    p.add_argument("--xti", action="store_true", help="also learn the composition with --method xti")
    p.add_argument("--grid", default=None, help="write a PNG: per concept, references, learned word, init word (8 each)")
    a = p.parse_args(argv)
    os.environ.setdefault("CONCEPTKIT_HOME", tempfile.mkdtemp(prefix="ck-bench-"))
    import torch

    torch.set_num_threads(a.threads)
    from conceptkit.features import load_encoder
    from conceptkit.implant.pipeline import ImplantConfig, run
    from conceptkit.models.load import load_model
    from conceptkit.toy.world import render, sample_scenes

    seeds = list(range(1000, 1000 + a.seeds))
    scenes = sample_scenes(a.images, seed=7)
    out: dict = {"steps": a.steps, "seeds": a.seeds, "images": a.images, "threads": a.threads}
    # 1. a composition under a new word: every factor readable
    refs = render([dataclasses.replace(s, shape="diamond", colour="red") for s in scenes])
    model = load_model("toy")
    t0 = time.perf_counter()
    res = run(model, ImplantConfig(images=_folder(refs), token="<thing>", init_word="shape", steps=a.steps))
    m = res.model
    concept = {"shape": "diamond", "colour": "red"}
    rows = {"<thing> (learned)": "a <thing>", "init word (baseline)": "a shape", "named prompt (ceiling)": "a red diamond"}
    rows_img = [refs[:8], _draw(m, "a <thing>", seeds[:8]), _draw(m, "a shape", seeds[:8]), _draw(m, "a <thing> at the top left", seeds[:8])]
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
    # 2. a colour the toy never drew
    brown = (139, 69, 19)
    refs = render(scenes, foreground=brown)
    model = load_model("toy")
    t0 = time.perf_counter()
    res = run(model, ImplantConfig(images=_folder(refs), token="<brown>", init_word="orange", steps=a.steps))
    m = res.model
    encoder = load_encoder("toy", "toy")
    learned, init = _draw(m, "a <brown>", seeds), _draw(m, "an orange shape", seeds)  # "a {}": the toy's training caption
    rows_img += [refs[:8], learned[:8], init[:8]]
    out["unseen_colour"] = {"train_seconds": round(time.perf_counter() - t0, 1), "loss": res.manifest["loss"],
                            "clip_similarity_to_references": {"learned": _similarity(encoder, learned, refs), "init word": _similarity(encoder, init, refs),
                                                              "references themselves": _similarity(encoder, refs, refs)},
                            "foreground_distance_to_brown": {"learned": _foreground_distance(learned, brown), "init word": _foreground_distance(init, brown),
                                                             "references": _foreground_distance(refs, brown)}}
    if a.grid:
        from PIL import Image

        from conceptkit.figures import grid_image

        cells = torch.from_numpy(np.concatenate(rows_img)).permute(0, 3, 1, 2).float() / 255
        cells = torch.nn.functional.interpolate(cells, scale_factor=3, mode="nearest")
        grid = grid_image(cells, len(rows_img), 8)
        Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(a.grid)
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")
    print(f"done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
