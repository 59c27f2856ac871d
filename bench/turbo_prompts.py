"""SliderSpace on a distilled model over a prompt set: the paper's COCO experiment (Sec. 5.3) scaled to `toy-turbo`.

    python bench/turbo_prompts.py [--prompts bench/turbo-prompts.txt] [--count 128] [--scale 4] [--record]

For each prompt of the file (one per line, `prompts.read_prompts_file`) it runs the two commands a
user would run, in a subprocess each:

    conceptkit sliders PROMPT --model toy-turbo --count 8 --samples 16 --train-steps 100 --pairs 2 --lr 5e-3 --calibration-seeds 4
    conceptkit evaluate sliders SET --teacher toy --random-baseline --count 128 --scale 4 --json

and reads each evaluation's saved embeddings (base, sliders, random directions, teacher, the
prompt's text) from the store. Per prompt: the evaluation's own figures. Pooled over the prompts:
  1. diversity and Vendi score: the mean over prompts of each prompt's own (within-prompt) score;
     the ratio sliders / base (and random / base), with a 95% stratified paired bootstrap: each
     resample draws the seeds of every prompt with replacement (`metrics.resample_counts`, seed
     1000 + prompt index), the same draws on both sides;
  2. CLIP score: the mean over all images of each image's score against its own prompt, bootstrapped
     the same way;
  3. Fréchet distance to the teacher: all prompts' images pooled against all the teacher's images of
     the same prompts and seeds (the COCO FID's way), with the teacher's two halves (even / odd seeds
     of every prompt) as the floor.
Prints one JSON record; with --record it writes it to bench/results/DATE-turbo-prompts-cpu.json.
Uses the store at CONCEPTKIT_HOME as it is (cached sets and evaluations are reused).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

BOOTSTRAP = 1000
LEVEL = 0.95


def conceptkit(*args: str) -> dict:
    """Run `python -m conceptkit ARGS --json` and return its JSON document."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "conceptkit", *args, "--json"], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def pooled(per_prompt: list[dict], side: str) -> dict:
    """Pooled ratios side / base over the prompts, with stratified paired-bootstrap intervals (see the module doc)."""
    import numpy as np

    from conceptkit import metrics

    def stats(arr, key, counts):
        x = arr[key]
        return (metrics.resampled_mean_pairwise_distance(x, counts), metrics.resampled_vendi_score(x, counts),
                metrics.resampled_clip_score(x, arr["text_embedding"], counts))

    n_p = len(per_prompt)
    base_b, side_b = np.zeros((3, BOOTSTRAP)), np.zeros((3, BOOTSTRAP))
    base_pt, side_pt = np.zeros(3), np.zeros(3)
    for i, arr in enumerate(per_prompt):
        n = len(arr["base_embeddings"])
        counts = metrics.resample_counts(n, BOOTSTRAP, 1000 + i)
        base_b += np.stack(stats(arr, "base_embeddings", counts)) / n_p
        side_b += np.stack(stats(arr, side, counts)) / n_p
        ones = np.ones((1, n))
        base_pt += np.array([s[0] for s in stats(arr, "base_embeddings", ones)]) / n_p
        side_pt += np.array([s[0] for s in stats(arr, side, ones)]) / n_p
    ratio = side_b / base_b
    lo, hi = np.percentile(ratio, [50 * (1 - LEVEL), 50 * (1 + LEVEL)], axis=1)
    names = ("diversity", "vendi", "clip_score")
    out = {"base": dict(zip(names, base_pt.tolist())), "side": dict(zip(names, side_pt.tolist()))}
    for j, name in enumerate(names):
        r = side_pt[j] / base_pt[j]
        if name == "clip_score":
            out["clip_score_change"], out["clip_score_change_ci"] = r - 1, [lo[j] - 1, hi[j] - 1]
        else:
            out[f"{name}_ratio"], out[f"{name}_ratio_ci"] = r, [lo[j], hi[j]]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=Path, default=ROOT / "bench" / "turbo-prompts.txt")
    ap.add_argument("--count", type=int, default=128, help="seeds per prompt (evaluate sliders --count)")
    ap.add_argument("--scale", type=float, default=4.0, help="evaluate sliders --scale")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    import numpy as np

    from conceptkit import metrics
    from conceptkit.evaluate.common import load_arrays
    from conceptkit.prompts import read_prompts_file

    started = time.perf_counter()
    prompts = read_prompts_file(args.prompts, "--prompts")
    rows, arrays = [], []
    for prompt in prompts:
        t0 = time.perf_counter()
        sset = conceptkit("sliders", prompt, "--model", "toy-turbo", "--count", "8", "--samples", "16", "--train-steps", "100",
                          "--pairs", "2", "--lr", "5e-3", "--calibration-seeds", "4")
        t1 = time.perf_counter()
        doc = conceptkit("evaluate", "sliders", sset["name"], "--teacher", "toy", "--random-baseline",
                         "--count", str(args.count), "--scale", f"{args.scale:g}")
        t2 = time.perf_counter()
        arrays.append(load_arrays(doc))
        r, t = doc["random_baseline"], doc["teacher"]
        fe = doc["factor_entropy"]
        rows.append({"prompt": prompt, "set": sset["name"], "labels": [s["label"] for s in doc["per_slider"]],
                     "evaluation": doc["key"], "seconds_sliders": t1 - t0, "seconds_evaluate": t2 - t1,
                     **{k: doc[k] for k in ("diversity_ratio", "diversity_ratio_ci", "vendi_ratio", "vendi_ratio_ci",
                                            "clip_score_change", "clip_score_change_ci")},
                     "vendi": {"base": doc["base"]["vendi"], "sliders": doc["sliders"]["vendi"], "teacher": t["set"]["vendi"]},
                     "random_baseline": {k: r[k] for k in ("diversity_ratio", "diversity_ratio_ci", "vendi_ratio", "vendi_ratio_ci",
                                                           "clip_score_change", "clip_score_change_ci")},
                     "frechet_distance_to_teacher": t["frechet_distance"],
                     "factor_entropy": {k: v["entropy"] for k, v in fe.items()}})
        print(f"{prompt!r}: diversity {doc['diversity_ratio']:.3f} vendi {doc['vendi_ratio']:.3f} "
              f"FD {t['frechet_distance']['base']:.3f} -> {t['frechet_distance']['sliders']:.3f} "
              f"({t1 - t0:.0f}+{t2 - t1:.0f} s)", file=sys.stderr)
    # the pooled figures (module doc, 1-3)
    cat = {k: np.concatenate([a[k] for a in arrays]) for k in ("base_embeddings", "slider_embeddings", "random_embeddings", "teacher_embeddings")}
    teacher_even = np.concatenate([a["teacher_embeddings"][0::2] for a in arrays])
    teacher_odd = np.concatenate([a["teacher_embeddings"][1::2] for a in arrays])
    record = {
        "bench": "turbo-prompts", "model": "toy-turbo", "teacher": "toy", "prompts": prompts, "count": args.count, "scale": args.scale,
        "per_image": 3, "ci_level": LEVEL, "ci_resamples": BOOTSTRAP, "threads": os.environ.get("OMP_NUM_THREADS"),
        "per_prompt": rows,
        "pooled": {"sliders": pooled(arrays, "slider_embeddings"), "random_baseline": pooled(arrays, "random_embeddings"),
                   "frechet_distance_to_teacher": {
                       "base": metrics.frechet_distance(cat["base_embeddings"], cat["teacher_embeddings"]),
                       "sliders": metrics.frechet_distance(cat["slider_embeddings"], cat["teacher_embeddings"]),
                       "random_baseline": metrics.frechet_distance(cat["random_embeddings"], cat["teacher_embeddings"]),
                       "floor": metrics.frechet_distance(teacher_even, teacher_odd)}},
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps(record, indent=1))
    if args.record:
        path = ROOT / "bench" / "results" / f"{time.strftime('%Y-%m-%d', time.gmtime())}-turbo-prompts-cpu.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
