"""Time `conceptkit cluster PROMPT --tau 0.9 --k 4` from an empty store (harvest included) and check its metrics.

Usage: python bench/cluster.py [--model toy] [--prompt "a red circle"] [--threads 2] [--sweeps] [--plots DIR] [--keep DIR]
The bar: at most 300 s on 2 CPU cores for the toy. Every metric in the JSON is recomputed from the
saved arrays with scikit-learn (tolerance 1e-6). Prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

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


if __name__ == "__main__":
    main()
