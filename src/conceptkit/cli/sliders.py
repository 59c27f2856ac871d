"""`conceptkit sliders PROMPT` (= `sliders train PROMPT`), `sliders list|show|rename|export`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

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
from conceptkit.sliders import defaults as slider_defaults


class _TrainByDefault(TyperGroup):
    """`conceptkit sliders "a person"` runs `sliders train "a person"`: anything that is not a
    subcommand name (or --help) goes to `train`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["train", *args]
        return super().parse_args(ctx, args)


sliders_app = typer.Typer(cls=_TrainByDefault, no_args_is_help=True,
                          help="SliderSpace: train K sliders for a prompt (`conceptkit sliders PROMPT`), list, show, rename, export.")
app.add_typer(sliders_app, name="sliders")


def _warn(message: str) -> None:
    """One warning line on stderr, never wrapped."""
    ui.err.print(f"warning: {message}", soft_wrap=True, markup=False, highlight=False)


def _table(sset) -> None:
    ui.table(f"sliders {sset.name} ({sset.prompt!r}, {sset.manifest['model']['spec']}, {sset.manifest['encoder']})",
             ["index", "label", "explained variance", "effect size", "alignment"],
             [(s.index, s.label, f"{s.explained_variance:.3f}", f"{s.effect_size:.4f}", f"{s.alignment:.2f}") for s in sset.sliders])


@sliders_app.command("train")
@command
def train(
    prompt: Annotated[str, typer.Argument(help="The concept, e.g. 'a person'.", show_default=False)],
    model: ModelOpt = None,
    count: Annotated[int, typer.Option("--count", "-k", help="Sliders (principal directions), 1-64.")] = 16,
    samples: Annotated[Optional[int], typer.Option("--samples", "-n", help="Harvested trajectories. Default by model: 16 on the toy and test models, 1000 on SD 1.x/2.x, SDXL and few-step models (the reference's).", show_default=False)] = None,
    x0: Annotated[Optional[str], typer.Option("--x0", help="all: x0 of every step enters the directions (the paper); final: the last step only. Default by model: final on the toy, all otherwise.", show_default=False)] = None,
    directions: Annotated[Optional[str], typer.Option("--directions", help="pca: the principal components (the paper); ica: the same principal subspace rotated to independent directions (purer when a concept's factors vary about equally; docs/sliders.md). Default by model: ica on the toy, pca otherwise.", show_default=False)] = None,
    encoder: Annotated[str, typer.Option(help="auto, pixel[:side], toy, clip:<id or folder>, dinov2:<id or folder>. auto: the toy CLIP for toy, pixel for tiny-sd/tiny-sdxl/tiny-flux/tiny-sd3, CLIP ViT-L/14 (about 1.7 GB, downloaded on first use) otherwise.")] = "auto",
    rank: Annotated[int, typer.Option(help="LoRA rank of each slider.")] = 1,
    targets: Annotated[str, typer.Option(help="Regex (full match) of the UNet's (or FLUX's / SD3's transformer's) modules that get sliders: nn.Linear or nn.Conv2d layers; add '|.*conv1' for the resnets' first convs. auto: cross-attention to_k/to_v on a UNet; both streams' attention keys and values in FLUX / SD3 (docs/sliders.md).")] = "auto",
    train_steps: Annotated[Optional[int], typer.Option("--train-steps", help="Optimiser steps (all sliders train in each). Default by model: 100 on the toy and test models, 3000 otherwise.", show_default=False)] = None,
    pairs: Annotated[Optional[int], typer.Option(help="Harvested (trajectory, step) pairs per optimiser step, shared by all sliders. Default by model: 2 on the toy and test models, 1 otherwise.", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate. Default by model: 5e-3 on the toy and test models, 2e-3 otherwise.", show_default=False)] = None,
    start: Annotated[float, typer.Option(help="Sliders act from this fraction of the denoising steps on.")] = 0.1,
    calibration_seeds: Annotated[Optional[int], typer.Option("--calibration-seeds", help="Seeds on which the set's strength is calibrated after training, so that strength 1 moves images along each slider's direction by 0.27 standard deviations of the harvested images, on average; 0: the sliders as trained. Default by model: 8 on the toy, 2 on test models, 4 otherwise.", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps of the harvest. Default: the model's.", show_default=False)] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale. Default: the model's.", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of harvest and training.")] = 0,
    name: Annotated[Optional[str], typer.Option(help="Set name. Default: the prompt, slugified.", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a set of that name trained with other settings.")] = False,
    export: Annotated[Optional[Path], typer.Option(help="Also write the sliders in kohya format to this folder (for ComfyUI, AUTOMATIC1111, Forge, kohya sd-scripts).", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (defaults used, trajectories, steps, disk, estimated time) and stop.")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute UNet and VAE-decoder activations in backward: less memory for large models, same sliders, slower steps.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    offload: OffloadOpt = "none",
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Train K sliders for a prompt: harvest, embed, PCA, one batched LoRA pass, labels. Resumable."""
    from conceptkit.sliders import sets as slider_sets  # deferred: --help loads no torch
    from conceptkit.sliders.train import TrainSettings  # deferred: --help loads no torch
    from conceptkit.sliders.pipeline import SlidersConfig, run  # deferred: --help loads no torch

    from conceptkit.sliders.targets import resolve_targets  # deferred: --help loads no torch

    def settings(d: dict, arch: str = "sd1") -> SlidersConfig:
        return SlidersConfig(prompt=prompt, count=count, samples=d["samples"], x0=d["x0"], directions=d["directions"], encoder=encoder,
                             rank=rank, targets=resolve_targets(targets, arch),
                             steps=steps, guidance=guidance, seed=seed, name=name, overwrite=overwrite,
                             gradient_checkpointing=gradient_checkpointing, calibration_seeds=d["calibration_seeds"],
                             train=TrainSettings(steps=d["train_steps"], pairs=d["pairs"], lr=d["lr"], start=start, seed=seed))

    given = dict(samples=samples, train_steps=train_steps, pairs=pairs, lr=lr, calibration_seeds=calibration_seeds,
                 directions=directions, x0=x0)
    settings(slider_defaults.resolve(slider_defaults.QUICK, **given)[0])  # bad input fails before the model loads
    if offload.strip().lower() in ("model", "sequential"):  # docs/models.md, "Memory"
        raise UsageError(f"--offload {offload} does not work with `sliders train`: the trained LoRA bank stays on the "
                         "device the layers had when it was installed (the CPU, under offload), and training "
                         "backpropagates through weights that offload moves away; use --offload none")
    from conceptkit.parallel import processes  # deferred: --help loads no torch

    proc, world = processes()  # this process's index and the process count under `accelerate launch`
    if world > 1 and device == "auto":  # under `accelerate launch`: this process's own device
        from accelerate import PartialState

        device = str(PartialState().device)
    loaded = open_model(model, device, dtype, config, encoders=[encoder], flow=True)  # names every download before any starts
    from conceptkit.models.flow import denoiser  # deferred: --help loads no torch
    from conceptkit.sliders.layers import select_targets  # deferred: --help loads no torch

    try:  # before the harvest: a regex that picks nothing, or a layer a slider cannot sit on, is bad usage
        select_targets(denoiser(loaded.pipe), resolve_targets(targets, loaded.arch))
    except ValueError as exc:
        raise UsageError(f"--targets {targets!r}: {exc}") from None
    if export is not None and loaded.arch == "sd3":
        raise UsageError("--export: SD3 has no kohya naming (SD 1.x, 2.x, SDXL and FLUX do); its slider files "
                         "load with StableDiffusion3Pipeline.load_lora_weights as they are")
    profile = slider_defaults.for_model(loaded)
    values, from_profile = slider_defaults.resolve(profile, **given)
    cfg = settings(values, loaded.arch)
    defaults_doc = {**profile.as_dict(), "from_profile": from_profile}
    used = (f"defaults for {profile.profile}: " + ", ".join(f"{n.replace('_', ' ')} {_shown(values[n])}" for n in from_profile)
            + f" ({profile.why})") if from_profile else None
    if dry_run:
        _dry_run(loaded, cfg, defaults_doc, json_out, used)
        return
    with ui.progress("sliders", unit="steps", enabled=proc == 0 and (not json_out or sys.stderr.isatty())) as bar:
        sset = run(loaded, cfg, progress=bar, stage=ui.info if sys.stderr.isatty() else None, on_wait=ui.info)
    if proc != 0:  # one report per launch, from the main process
        return
    doc = {**sset.to_json(), "defaults": defaults_doc}
    if export is not None:
        doc["export"] = [str(p) for p in slider_sets.export_set(sset.name, export, warn=_warn)]
    if json_out:
        ui.print_json(doc)
        return
    _table(sset)
    if used:
        ui.info(used)
    ui.info(f"set {sset.name}  {sset.path}" + ("  (cached)" if sset.cached else f"  {sset.seconds:.0f}s"))


def _shown(value) -> str:
    """A default's value as the defaults line shows it: numbers in %g, words as they are."""
    return value if isinstance(value, str) else f"{value:g}"


def _dry_run(loaded, cfg, defaults_doc: dict, json_out: bool, used: str | None) -> None:
    """The plan of a run: what it will harvest and train, the harvest's disk size, an estimated time."""
    from conceptkit.sliders.plan import make_plan  # deferred: --help loads no torch

    with ui.err.status("timing one UNet call"):
        plan = make_plan(loaded, cfg.prompt, cfg.samples, cfg.steps, cfg.guidance, cfg.count, cfg.train.steps,
                         cfg.train.pairs, cfg.train.symmetric, calibration_seeds=cfg.calibration_seeds)
    doc = {"dry_run": True, "model": loaded.spec, "arch": loaded.arch, "defaults": defaults_doc, "plan": plan.as_dict()}
    if json_out:
        ui.print_json(doc)
        return
    ui.table(f"plan: {cfg.count} sliders for {cfg.prompt!r} on {loaded.spec} ({loaded.arch}, {defaults_doc['profile']} defaults)",
             ["trajectories", "steps", "guidance", "train steps", "pairs", "harvest on disk", "in memory", "one UNet call",
              "harvest (est.)", "training (est.)", "calibration (est.)"],
             [(plan.trajectories, plan.steps, f"{plan.guidance:g}", plan.train_steps, plan.pairs,
               ui.human_size(plan.harvest_bytes), ui.human_size(plan.pca_memory_bytes), f"{plan.unet_call_s:.3f} s (batch {plan.batch})", ui.human_age(plan.harvest_s),
               ui.human_age(plan.train_s), ui.human_age(plan.calibration_s) if cfg.calibration_seeds else "off")])
    if used:
        ui.info(used)
    ui.info("estimates from the measured call: one per harvest batch and step; per training step one batched pass "
            "with backward (decoding and embedding left out); calibration samples every slider at -s and +s three times; "
            "nothing was written")


@sliders_app.command("list")
@command
def list_(json_out: JsonOpt = False) -> None:
    """List the slider sets in the store (damaged ones on stderr, with their path)."""
    from conceptkit.sliders.sets import damaged_sets, list_sets  # deferred: --help loads no torch

    sets = list_sets()
    for exc in damaged_sets():
        ui.info(str(exc))
    if json_out:
        ui.print_json([{"name": s.name, "path": str(s.path), "prompt": s.prompt, "model": s.manifest["model"]["spec"],
                        "encoder": s.manifest["encoder"], "sliders": len(s.sliders)} for s in sets])
        return
    ui.table("slider sets", ["name", "prompt", "model", "encoder", "sliders"],
             [(s.name, s.prompt, s.manifest["model"]["spec"], s.manifest["encoder"], len(s.sliders)) for s in sets])


@sliders_app.command("show")
@command
def show(name: Annotated[str, typer.Argument(help="Set name.")], json_out: JsonOpt = False) -> None:
    """Show one set: its sliders, labels, explained variance and effect sizes."""
    from conceptkit.sliders.sets import load_set  # deferred: --help loads no torch

    sset = load_set(name)
    if json_out:
        ui.print_json(sset.to_json())
        return
    _table(sset)


@sliders_app.command("rename")
@command
def rename(
    name: Annotated[str, typer.Argument(help="Set name.")],
    old: Annotated[str, typer.Argument(help="Current label or index.")],
    new: Annotated[str, typer.Argument(help="New label.")],
    json_out: JsonOpt = False,
) -> None:
    """Relabel one slider of a set (labels stay unique)."""
    from conceptkit.sliders.sets import rename as do_rename  # deferred: --help loads no torch

    sset = do_rename(name, old, new)
    if json_out:
        ui.print_json(sset.to_json())
        return
    _table(sset)


@sliders_app.command("export")
@command
def export(
    name: Annotated[str, typer.Argument(help="Set name.")],
    folder: Annotated[Path, typer.Argument(help="Output folder.")],
    format: Annotated[str, typer.Option("--format", help="kohya: lora_unet_... keys with alpha and an ss_/modelspec header, which ComfyUI, AUTOMATIC1111, Forge, diffusers and kohya sd-scripts load (LDM names for SDXL).")] = "kohya",
    workflow: Annotated[Optional[list[str]], typer.Option("--workflow", help="Also write, repeatable: comfyui (an API-format workflow applying the sliders with LoRA hook keyframes from the set's start on) or a1111 (prompts for sd-webui-loractl and plain <lora:...> tags).", show_default=False)] = None,
    slider: Annotated[Optional[list[str]], typer.Option("--slider", "-s", help="LABEL_OR_INDEX=SCALE, repeatable: the sliders the workflow and prompts use, at these strengths (-20 to 20). Default: every slider at 0.", show_default=False)] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="The checkpoint file the ComfyUI workflow loads (its name in ComfyUI/models/checkpoints). Default: the set's model file, for a single-file model.", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps of the workflow and prompts. Default: the set's.", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the workflow and prompts.")] = 0,
    negative: Annotated[str, typer.Option(help="Negative prompt of the workflow and prompts.")] = "",
    json_out: JsonOpt = False,
) -> None:
    """Write a set's sliders in kohya format (the file every other tool loads), and optionally a ComfyUI workflow and A1111 prompts that keep the slider window."""
    from conceptkit.sliders.clients import ClientSettings, parse_strengths, write_clients  # deferred: --help loads no torch
    from conceptkit.sliders.sets import export_set, load_set  # deferred: --help loads no torch

    if format != "kohya":
        raise UsageError(f"unknown --format {format!r}; only kohya is supported (the set's own files are diffusers/peft)")
    formats = tuple(dict.fromkeys(workflow or ()))
    for f in formats:
        if f not in ("comfyui", "a1111"):
            raise UsageError(f"unknown --workflow {f!r}; choose comfyui or a1111")
    sset = load_set(name)
    model = sset.manifest["model"]
    if checkpoint is None and model.get("source") == "single-file":
        checkpoint = Path(model["spec"]).name
    cfg = ClientSettings(parse_strengths(sset, slider or ()), checkpoint=checkpoint, seed=seed, steps=steps, negative=negative)
    if "comfyui" in formats and cfg.checkpoint is None:
        raise UsageError(f"--checkpoint: name the checkpoint file ComfyUI loads for {model['spec']} "
                         "(in ComfyUI/models/checkpoints), e.g. --checkpoint sd15.safetensors")
    paths = export_set(name, folder, warn=_warn)
    clients = write_clients(sset, folder, formats, cfg) if formats else None
    if json_out:
        doc = {"name": name, "files": [str(p) for p in paths]}
        if clients is not None:
            doc.update({"workflows": [str(p) for p in clients.files], "steps": clients.steps, "first_step": clients.first_step,
                        "comfyui_start_percent": clients.start_percent, **({"a1111": clients.a1111} if clients.a1111 else {})})
        ui.print_json(doc)
        return
    for p in paths + (clients.files if clients else []):
        ui.info(str(p))
