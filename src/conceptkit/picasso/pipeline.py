"""Picasso end to end on a loaded model: concept-neuron statistics of a harvest, the clustering, the
sweeps, the figures, one cluster artifact written whole.

Cai et al., "Picasso": per-timestep concept neurons (`picasso.neurons`, Cones' importance), a
high-pass threshold, PCA and fuzzy c-means into k sub-concepts (`picasso.cluster`); the cluster
centres drawn as maps, the segmentation of reference images and the timestep-similarity heatmap
(`picasso.plots`). The arrays, figures and manifest go into a temporary folder renamed into place
(`picasso.cluster.save`), so a kill leaves the old artifact or the new one, never a part. Sweep
plots go to `plots`, a folder the user chose, outside the artifact.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from conceptkit import harvest as harvest_stage
from conceptkit.diffusion import decode_batched
from conceptkit.picasso import cluster as picasso
from conceptkit.picasso import plots
from conceptkit.picasso.cluster import ClusterConfig
from conceptkit.picasso.neurons import NeuronConfig
from conceptkit.picasso.neurons import run as neuron_statistics

Progress = Callable[[str, int, int], None]  # progress(stage, done, total); stages "neurons", "sweep k", ...


def reference_images(model, harvest_path: Path, n: int = 4):
    """The first `n` final samples of the harvest, decoded: (n, 3, H, W) in [0, 1]."""
    return decode_batched(model, harvest_stage.load_harvest(harvest_path, samples=n, names=()).final).numpy()


def run(model, harvest_path: Path, neurons: NeuronConfig, config: ClusterConfig, *,
        sweeps: dict[str, Sequence[float]] | None = None, plots_dir: Path | None = None,
        embedding: dict[str, str] | None = None, progress: Progress | None = None, on_wait=None) -> dict[str, Any]:
    """Cluster the concept neurons of the harvest at `harvest_path` (see the module doc); returns the manifest.

    Args:
        model: the `LoadedModel` the harvest was made with (with its textual-inversion token, if any).
        neurons, config: the neuron statistics' and the clustering's settings.
        sweeps: {"k" | "tau" | "temporal_dim": values} to sweep besides the one clustering.
        plots_dir: folder for the sweep plots (PNG); None: no plots.
        embedding: {"path", "token"} of a textual-inversion embedding, recorded in the manifest.
        progress: called with (stage, done, total).
    """
    started = time.perf_counter()

    def bar(stage: str):
        return None if progress is None else (lambda done, total: progress(stage, done, total))

    result = neuron_statistics(model, harvest_path, neurons, progress=bar("neurons"), on_wait=on_wait)
    stats = result.stats
    res = picasso.cluster(stats, config)
    sweep_out, sweep_images = {}, {}
    for name, values in (sweeps or {}).items():
        points = picasso.sweep(stats, config, name, values, progress=bar(f"sweep {name}"))
        sweep_out[name] = [{"value": p.value, "n_neurons_kept": p.n_kept, "metrics": picasso.scores_dict(p.scores, p.seconds),
                            **({"error": p.error} if p.error else {})} for p in points]
        if plots_dir is not None:
            sweep_images[f"sweep_{name}"] = plots.sweep_figure(Path(plots_dir) / f"sweep-{name}.png", name, points)

    def figures(folder: Path) -> dict[str, str]:
        return {
            "centre_maps": plots.centre_maps_figure(folder / "centre_maps.png", res.centre_maps, f"{stats.manifest['prompts'][0]}: k={config.k}"),
            "segmentation": plots.segmentation_figure(folder / "segmentation.png", res.segmentation, config.k,
                                               references=reference_images(model, harvest_path)),
            "similarity": plots.similarity_figure(folder / "similarity.png", res.similarity.jaccard, res.similarity.cluster_correlation,
                                           res.similarity.cluster_jaccard, [int(t) for t in stats.timesteps]),
        }

    def describe(key: str, folder: Path, arrays: dict, images: dict) -> dict:
        return {
            "key": key, "path": str(folder), "harvest": Path(harvest_path).name, "neurons": result.key, "model": model.spec,
            "prompts": stats.manifest["prompts"], "concept_tokens": stats.manifest["concept_tokens"], "importance": neurons.importance,
            "tau": config.tau, "tau_mode": config.tau_mode, "k": config.k, "temporal_dim": config.temporal_dim,
            "pca_dim": int(res.features.shape[1]), "fuzziness": config.fuzziness, "seed": config.seed,
            "timesteps": [int(t) for t in stats.timesteps], "n_neurons": stats.n_neurons,
            "n_neurons_kept": len(res.selection.neuron), "metrics": picasso.scores_dict(res.scores, res.clustering.seconds),
            "fcm_iterations": res.clustering.n_iter, "clusters": picasso.cluster_rows(stats, res), "arrays": arrays,
            "images": {**images, **sweep_images}, "sweeps": sweep_out, "neurons_bytes_per_step": stats.manifest.get("bytes_per_step"),
            **({"embedding": dict(embedding)} if embedding is not None else {}),
            "seconds": round(time.perf_counter() - started, 3),
        }

    key, folder, arrays, images = picasso.save_cluster(stats, res, on_wait=on_wait, figures=figures, describe=describe)
    return {**describe(key, folder, arrays, images), "seconds": round(time.perf_counter() - started, 3)}
