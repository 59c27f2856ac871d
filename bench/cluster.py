"""Time `conceptkit cluster PROMPT --tau 0.9 --k 4` from an empty store (harvest included) and check its metrics;
or measure its sub-concepts' images (VbSC) against random neuron groups.

Usage: python bench/cluster.py [--model toy] [--prompt "a red circle"] [--threads 2] [--sweeps] [--plots DIR] [--keep DIR]
The bar: at most 300 s on 2 CPU cores for the toy. Every metric in the JSON is recomputed from the
saved arrays with scikit-learn (tolerance 1e-6). Prints one JSON document on stdout. This one runs the
command in a fresh process on purpose: it times what a user waits for, interpreter start included.

       python bench/cluster.py vbsc [--prompt "a red circle"] [--images 32] [--draws 5] [--modes close,only] [--grids DIR]
                             [--embedding FILE --token WORD --temporal-dim D]   (a word learned by `conceptkit implant`)
Clusters PROMPT through the library (`picasso.pipeline.run`, cached in --keep), renders every sub-concept in each mode and as many random
neuron groups of the same sizes (`conceptkit.evaluate.vbsc.vbsc`), embeds the images with the toy
CLIP and scores them as a clustering; reads the toy images with the analyser. One JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="toy")
    p.add_argument("--prompt", default="a red circle")
    p.add_argument("--tau", default="0.9")
    p.add_argument("--k", default="4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sweeps", action="store_true", help="also run --sweep-k 2:8 --sweep-tau 0.5:0.95:10 --sweep-temporal-dim 1:4")
    p.add_argument("--plots", default=None, help="folder for the sweep plots")
    p.add_argument("--keep", default=None, help="use this CONCEPTKIT_HOME (kept) instead of a temporary one")
    p.add_argument("extra", nargs="*", help="more cluster options, after --")
    args = p.parse_args()

    home = args.keep or tempfile.mkdtemp(prefix="ck-bench-")
    env = {**os.environ, "CONCEPTKIT_HOME": home, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "conceptkit", "cluster", args.prompt, "--model", args.model, "--tau", args.tau, "--k", args.k, "--json"]
    if args.sweeps:
        cmd += ["--sweep-k", "2:8", "--sweep-tau", "0.5:0.95:10", "--sweep-temporal-dim", "1:4"]
    if args.plots:
        cmd += ["--plots", args.plots]
    cmd += args.extra
    t0 = time.perf_counter()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        sys.stderr.write(run.stderr)
        raise SystemExit(run.returncode)
    doc = json.loads(run.stdout)

    from sklearn.metrics import (
        calinski_harabasz_score,
        davies_bouldin_score,
        silhouette_score,
    )

    x = np.load(doc["arrays"]["features"])
    labels = np.load(doc["arrays"]["labels"])
    u = np.load(doc["arrays"]["membership"])
    again = {
        "calinski_harabasz": calinski_harabasz_score(x, labels),
        "davies_bouldin": davies_bouldin_score(x, labels),
        "silhouette": silhouette_score(x, labels),
        "fpc": float(np.sum(u**2) / u.shape[1]),
    }
    worst = max(abs(doc["metrics"][k] - v) for k, v in again.items())
    out = {
        "command": " ".join(cmd[2:]),
        "threads": args.threads,
        "wall_seconds": round(wall, 2),
        "command_seconds": doc["seconds"],
        "under_300s": wall <= 300,
        "n_neurons": doc["n_neurons"],
        "n_neurons_kept": doc["n_neurons_kept"],
        "metrics": doc["metrics"],
        "recomputed_max_abs_diff": worst,
        "clusters": [{k: c[k] for k in ("cluster", "size", "group_share", "top_neurons")} for c in doc["clusters"]],
        "images": doc["images"],
        "neurons_bytes_per_step": doc["neurons_bytes_per_step"],
        "sweeps": {name: [(pt["value"], pt["n_neurons_kept"], pt["metrics"]) for pt in pts] for name, pts in doc["sweeps"].items()},
        "home": home,
    }
    print(json.dumps(out, indent=2, default=str))


def vbsc_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="bench/cluster.py vbsc", description="VbSC: sub-concept images against random neuron groups")
    p.add_argument("--model", default="toy")
    p.add_argument("--prompt", default="a red circle")
    p.add_argument("--tau", default="0.9")
    p.add_argument("--k", default="4")
    p.add_argument("--images", type=int, default=32, help="images per sub-concept (and per random group)")
    p.add_argument("--draws", type=int, default=5, help="random neuron groupings")
    p.add_argument("--modes", default="close,only")
    p.add_argument("--encoder", default="toy")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grids", default=None, help="write one PNG per mode: unmodified row, then a row per sub-concept")
    p.add_argument("--keep", default=None, help="use this CONCEPTKIT_HOME (kept) instead of a temporary one")
    p.add_argument("--samples", type=int, default=8, help="harvest trajectories (the cluster command's default)")
    p.add_argument("--embedding", default=None, help="a learned word (`conceptkit implant`) the prompt uses, with --token")
    p.add_argument("--token", default=None)
    p.add_argument("--temporal-dim", type=int, default=3, help="Picasso's D (a temporal embedding's own D is usual)")
    args = p.parse_args(argv)

    home = args.keep or tempfile.mkdtemp(prefix="ck-bench-")
    os.environ.update(CONCEPTKIT_HOME=home, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from conceptkit import harvest
    from conceptkit.evaluate import vbsc as picasso_eval
    from conceptkit.models.load import load_model
    from conceptkit.picasso import pipeline, subconcepts
    from conceptkit.picasso.cluster import ClusterConfig
    from conceptkit.picasso.neurons import NeuronConfig

    # the clustering `conceptkit cluster PROMPT --tau T --k K` makes, through the library (cached in --keep)
    model = load_model(args.model)
    embedding = None
    if args.embedding:
        from conceptkit.models.textual_inversion import add_embedding

        model = add_embedding(model, args.embedding, args.token)
        embedding = {"path": args.embedding, "token": args.token}
    made = harvest.run(model, harvest.HarvestConfig(prompts=(args.prompt,), samples=args.samples))
    doc = pipeline.run(model, made.path, NeuronConfig(), ClusterConfig(tau=float(args.tau), k=int(args.k), temporal_dim=args.temporal_dim),
                       embedding=embedding)
    cmd = [sys.executable, "-m", "conceptkit", "cluster", args.prompt, "--model", args.model, "--tau", args.tau, "--k", args.k,
           "--samples", str(args.samples)]
    sub = subconcepts.load_map(doc["key"])
    cfg = picasso_eval.VbscConfig(images=args.images, draws=args.draws, modes=tuple(args.modes.split(",")), encoder=args.encoder)
    res = picasso_eval.vbsc(model, sub, cfg, progress=lambda d, t: print(f"\r{d}/{t} groups", end="", file=sys.stderr))
    print(file=sys.stderr)
    out = {"command": " ".join(cmd[2:]), "threads": args.threads, "cluster_metrics": doc["metrics"],
           "clusters": [{k: c[k] for k in ("cluster", "size", "group_share", "layer_share")} for c in doc["clusters"]],
           "vbsc": picasso_eval.to_dict(res), "home": home}
    if args.grids:
        from conceptkit.figures import grid_image
        from conceptkit.infotext import write_png

        grids = {}
        for mode in cfg.modes:
            path = os.path.join(args.grids, f"subconcepts-{mode}.png")
            cells = torch.nn.functional.interpolate(subconcepts.grid(model, sub, range(8), mode=mode), scale_factor=3, mode="nearest")
            image = grid_image(cells, sub.k + 1, 8)
            settings = {"prompt": sub.prompts[0], "steps": model.default_steps, "guidance": model.default_guidance,
                        "seeds": list(range(8)), "model": model.identity(), "cluster_key": sub.key, "mode": mode,
                        "rows": ["unmodified", *[f"sub-concept {c}" for c in range(sub.k)]]}
            write_png(image, Path(path), settings, model)
            grids[mode] = path
        out["grids"] = grids
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "vbsc":
        vbsc_main(sys.argv[2:])
    else:
        main()
