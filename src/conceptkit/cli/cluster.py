"""`conceptkit cluster`: Picasso's sub-concepts of a concept's neurons."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from conceptkit import ui
from conceptkit.cli.common import (
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    OffloadOpt,
    JsonOpt,
    ModelOpt,
    app,
    command,
    open_model,
)
from conceptkit.errors import UsageError


def _with_embedding(loaded, embedding, token, prompts):
    """The model with a textual-inversion token added (--embedding/--token), or unchanged."""
    from conceptkit.models import textual_inversion  # deferred: --help loads no torch

    if embedding is None:
        return loaded
    textual_inversion.check_in_prompts(token, prompts)
    return textual_inversion.add_embedding(loaded, embedding, token)


def _harvest(prompt, harvest_key, model, samples, steps, guidance, seed, device, dtype, config, bar_on, embedding=None, token=None,
             offload="none"):
    """(loaded model, harvest folder): the given harvest, or a fresh (cached) one of PROMPT."""
    from conceptkit import harvest as stage  # deferred: --help loads no torch
    from conceptkit import store  # deferred: --help loads no torch

    if (prompt is None) == (harvest_key is None):
        raise UsageError("give a PROMPT or --harvest KEY (one of them)")
    if harvest_key is not None:
        art = store.find("harvest", harvest_key)
        manifest = art.manifest()
        if not manifest.get("samples"):
            raise UsageError(f"harvest {art.key} holds no samples; run `conceptkit harvest` again to complete it")
        loaded = open_model(model or manifest["model"]["spec"], device, dtype, config, flow=True, offload=offload)
        return _with_embedding(loaded, embedding, token, manifest["prompts"]), art.path
    cfg = stage.HarvestConfig(prompts=(prompt,), samples=samples, steps=steps, guidance=guidance, seed=seed)
    loaded = _with_embedding(open_model(model, device, dtype, config, flow=True, offload=offload), embedding, token, [prompt])
    with ui.progress("harvest", unit="samples", enabled=bar_on) as bar:
        result = stage.run(loaded, cfg, progress=bar, on_wait=ui.info)
    return loaded, result.path


@app.command()
@command
def cluster(
    prompt: Annotated[Optional[str], typer.Argument(help="The concept prompt, e.g. 'a red circle'.", show_default=False)] = None,
    harvest: Annotated[Optional[str], typer.Option("--harvest", help="Use this harvest (key or prefix) instead of a PROMPT.", show_default=False)] = None,
    model: ModelOpt = None,
    tau: Annotated[float, typer.Option(help="High-pass threshold on neuron importance (a quantile in [0, 1) by default).")] = 0.9,
    tau_mode: Annotated[str, typer.Option(help="quantile, relative (tau x max) or absolute.")] = "quantile",
    k: Annotated[int, typer.Option("--k", help="Sub-concepts (fuzzy c-means clusters).")] = 4,
    temporal_dim: Annotated[Optional[int], typer.Option("--temporal-dim", "-D", help="Timestep groups D; group of t is int(t*D/1000). Default: 3, or a temporal --embedding's own D.", show_default=False)] = None,
    pca_dim: Annotated[int, typer.Option(help="PCA components before clustering.")] = 8,
    fuzziness: Annotated[float, typer.Option(help="FCM fuzzifier m (> 1).")] = 2.0,
    map_size: Annotated[Optional[int], typer.Option(help="Side the Fs maps are resized to. Default: the largest layer's.", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the harvest, the re-noising and the clustering.")] = 0,
    concept: Annotated[Optional[str], typer.Option(help="Words of the prompt that are the concept. Default: the whole prompt.", show_default=False)] = None,
    importance: Annotated[str, typer.Option(help="grad (Cones' weight x gradient) or activation (cheaper).")] = "grad",
    reference_images: Annotated[Optional[Path], typer.Option(help="Folder of reference images. Default: the harvest's samples.", show_default=False)] = None,
    embedding: Annotated[Optional[Path], typer.Option(help="A learned textual-inversion embedding (.safetensors) for --token.", show_default=False)] = None,
    token: Annotated[Optional[str], typer.Option(help="The new word the prompt uses for --embedding, e.g. '<my-dog>'.", show_default=False)] = None,
    samples: Annotated[int, typer.Option("--samples", "-n", help="Harvest trajectories (references) for a PROMPT.")] = 8,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps for a PROMPT. Default: the model's.", show_default=False)] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale for a PROMPT. Default: the model's.", show_default=False)] = None,
    sweep_k: Annotated[Optional[str], typer.Option(help="Also sweep k, e.g. 2:8.", show_default=False)] = None,
    sweep_tau: Annotated[Optional[str], typer.Option(help="Also sweep tau, START:STOP:COUNT, e.g. 0.5:0.95:10.", show_default=False)] = None,
    sweep_temporal_dim: Annotated[Optional[str], typer.Option(help="Also sweep D, e.g. 1:4.", show_default=False)] = None,
    plots: Annotated[Optional[Path], typer.Option(help="Write sweep plots (PNG) to this folder.", show_default=False)] = None,
    fs_size: Annotated[Optional[int], typer.Option(help="Store Fs maps pooled to at most this side (saves disk on SDXL). Default: each layer's resolution.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="References per UNet call.")] = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    offload: OffloadOpt = "none",
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Cluster a concept's neurons into sub-concepts (Picasso): importance per timestep, high-pass, PCA, fuzzy c-means."""
    from conceptkit.models import textual_inversion  # deferred: --help loads no torch
    from conceptkit.picasso import cluster as picasso  # deferred: --help loads no torch
    from conceptkit.picasso import neurons as concept_neurons  # deferred: --help loads no torch
    from conceptkit.picasso import pipeline  # deferred: --help loads no torch

    started = time.perf_counter()
    # 1. settings first: bad input fails before any model is loaded
    if offload.strip().lower() == "sequential" and embedding is not None:  # docs/models.md, "Memory"
        raise UsageError("--offload sequential does not work with --embedding: the learned word resizes the text "
                         "encoder's embedding table, which sequential offload keeps on the meta device; use --offload model")
    if offload.strip().lower() in ("model", "sequential") and importance == "grad":  # docs/models.md, "Memory"
        raise UsageError(f"--offload {offload} does not work with --importance grad: it takes gradients with respect "
                         "to the layer weights, which offload keeps off the GPU; use --importance activation")
    textual_inversion.check_token(token, embedding)
    if embedding is not None and prompt is not None:
        textual_inversion.check_in_prompts(token, [prompt])
    if temporal_dim is None:  # a word learned in D timestep groups is clustered in its own groups
        temporal_dim = (textual_inversion.temporal_dim_of(embedding, token) if embedding is not None else None) or 3
    ccfg = picasso.ClusterConfig(tau=tau, tau_mode=tau_mode, k=k, temporal_dim=temporal_dim, pca_dim=pca_dim,
                                 fuzziness=fuzziness, seed=seed, map_size=map_size)
    ncfg = concept_neurons.NeuronConfig(concept=concept, importance=importance, seed=seed, batch_size=batch_size, fs_size=fs_size,
                                        reference_images=str(reference_images) if reference_images else None)
    sweeps = {name: picasso.parse_range(text, name.replace("_", "-"), integer=name != "tau")
              for name, text in (("k", sweep_k), ("tau", sweep_tau), ("temporal_dim", sweep_temporal_dim)) if text}
    bar_on = not json_out or sys.stderr.isatty()
    # 2. the harvest (cached), then Picasso: neuron statistics (cached), clustering, sweeps, one artifact
    loaded, harvest_path = _harvest(prompt, harvest, model, samples, steps, guidance, seed, device, dtype, config, bar_on,
                                    embedding, token, offload)
    with ui.stage_progress({"neurons": "steps", "sweep": "fits"}, enabled=bar_on) as bar:
        doc = pipeline.run(loaded, harvest_path, ncfg, ccfg, sweeps=sweeps, plots_dir=plots, progress=bar, on_wait=ui.info,
                           embedding={"path": str(embedding), "token": token} if embedding is not None else None)
    doc["seconds"] = round(time.perf_counter() - started, 3)  # the whole command, harvest included
    if json_out:
        ui.print_json(doc)
        return
    _render(doc)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _render(doc: dict) -> None:
    ui.table(f"sub-concepts of {doc['prompts'][0]!r} ({doc['n_neurons_kept']} of {doc['n_neurons']} (timestep group, neuron) items kept, tau {doc['tau']})",
             ["cluster", "size", "share per timestep group", "share per layer", "top neurons"],
             [(r["cluster"], r["size"], " ".join(f"g{g}:{s:.2f}" for g, s in r["group_share"].items()),
               " ".join(f"{n}:{s:.2f}" for n, s in list(r["layer_share"].items())[:4]), " ".join(r["top_neurons"][:3])) for r in doc["clusters"]])
    m = doc["metrics"]
    ui.table("metrics", ["calinski-harabasz", "davies-bouldin", "silhouette", "fpc", "fcm seconds"],
             [(_fmt(m["calinski_harabasz"]), _fmt(m["davies_bouldin"]), _fmt(m["silhouette"]), _fmt(m["fpc"]), f"{m['seconds']:.3f}")])
    for name, points in doc["sweeps"].items():
        ui.table(f"sweep over {name}", [name, "kept", "calinski-harabasz", "davies-bouldin", "silhouette", "fpc", "fcm seconds"],
                 [(_fmt(p["value"]), p["n_neurons_kept"], *(_fmt(p["metrics"][x]) for x in ("calinski_harabasz", "davies_bouldin", "silhouette", "fpc")),
                   p.get("error") or f"{p['metrics']['seconds']:.3f}") for p in points])
    ui.info(f"key {doc['key']}  {doc['path']}")
    for name, path in doc["images"].items():
        ui.info(f"{name.replace('_', ' ')}: {path}")
