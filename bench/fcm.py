"""Picasso's clustering cost: PCA + fuzzy c-means time against the number of kept neurons.

The maps are synthetic (smooth random blobs around k centres plus noise, unit-normalised like
`picasso.select`'s), at the map side of the architecture's largest cross-attention layer, so the
cost at real scale is measured without a real model. The tau curve follows: with the quantile
high-pass, tau keeps (1 - tau) of the architecture's neuron-timestep items.

    python bench/fcm.py --arch sd15
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

SIDE = {"toy": 8, "sd15": 64, "sdxl": 64, "flux": 64}  # map side of the largest cross-attention layer at native size
# (FLUX.1 at 1024 px: 64x64 image tokens in every joint block)


def neuron_count(arch: str) -> int:
    """to_k + to_v output channels over every cross-attention layer of the architecture's UNet
    (FLUX.1: add_k_proj + add_v_proj of its 19 joint blocks, docs/picasso.md)."""
    import torch

    if arch == "flux":
        from conceptkit.models.flow import build_real_transformer
        from conceptkit.picasso.joint import concept_layers

        return sum(p.out_features for p in concept_layers(build_real_transformer("flux-dev"))[1])
    from diffusers import UNet2DConditionModel

    from conceptkit.models import full as full_models
    from conceptkit.toy import weights_path

    with torch.device("meta"):
        if arch == "toy":
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(weights_path() / "unet"))
        else:
            unet = UNet2DConditionModel(**(full_models.SD15_UNET if arch == "sd15" else full_models.SDXL_UNET))
    return sum(m.to_k.out_features + m.to_v.out_features for name, m in unet.named_modules() if name.endswith("attn2"))


def synthetic_maps(n: int, side: int, k: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    centres = []
    for _ in range(k):
        cy, cx, w = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
        centres.append(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * w * w)).ravel())
    labels = rng.integers(0, k, n)
    maps = np.stack(centres)[labels] + 0.3 * rng.random((n, side * side), dtype=np.float32)
    return (maps / np.linalg.norm(maps, axis=1, keepdims=True)).astype(np.float32)


def measure(arch: str, sizes: list[int], k: int = 4, pca_dim: int = 8, temporal_dim: int = 3,
            taus: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)) -> dict:
    from conceptkit.picasso.maths import cluster_fcm, reduce_pca

    side, neurons = SIDE[arch], neuron_count(arch)
    items = neurons * temporal_dim

    def one(n: int) -> dict:
        maps = synthetic_maps(n, side, k)
        t0 = time.perf_counter()
        z, _ = reduce_pca(maps, pca_dim)
        t1 = time.perf_counter()
        res = cluster_fcm(z, k)
        t2 = time.perf_counter()
        return {"kept": n, "pca_s": round(t1 - t0, 4), "fcm_s": round(t2 - t1, 4), "fpc": round(float(res.fpc), 4)}

    rows = [one(n) for n in sizes]
    tau_rows = [{"tau": tau, **one(max(k, round((1 - tau) * items)))} for tau in taus]
    # how cost grows: slope of log(time) against log(n) between the smallest and largest size
    a, b = rows[0], rows[-1]
    slope = float(np.log((b["pca_s"] + b["fcm_s"]) / (a["pca_s"] + a["fcm_s"])) / np.log(b["kept"] / a["kept"]))
    return {"bench": "cluster", "arch": arch, "map_side": side, "neurons": neurons, "items": items, "k": k,
            "pca_dim": pca_dim, "sizes": rows, "tau_curve": tau_rows, "growth_exponent": round(slope, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(SIDE), default="toy")
    p.add_argument("--sizes", default="500,2000,8000,32000")
    a = p.parse_args()
    print(json.dumps(measure(a.arch, [int(s) for s in a.sizes.split(",")]), indent=2))


if __name__ == "__main__":
    main()
