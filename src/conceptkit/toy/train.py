"""Train the toy model from scratch, reproducibly: `python -m conceptkit.toy.train`.

Stages run in order (clip, vae, vae-decoder, clip-vision, clip-contrast, unet, turbo); each checkpoints under `--workdir/<stage>/` and resumes
from there. A finished stage exports its model to `--workdir/export/<stage>/`, and is skipped on
a rerun. The UNet stage exports the whole pipeline (EMA weights) to `--output` at every
checkpoint, so that folder is always a loadable `StableDiffusionPipeline`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from conceptkit.toy.checkpoint import replace_folder
from conceptkit.toy.data import make_pool
from conceptkit.toy.model import ToyArchitecture, load_clip, weights_path
from conceptkit.toy.parser import OneLineParser
from conceptkit.toy.train_clip import ClipTrainConfig, train_clip, zero_shot_accuracy
from conceptkit.toy.train_turbo import TurboTrainConfig, train_turbo
from conceptkit.toy.train_unet import UnetTrainConfig, train_unet
from conceptkit.toy.train_vae import VaeTrainConfig, reconstruction_report, train_vae
from conceptkit.toy.turbo_quality import make_probe

STAGES = ("clip", "vae", "vae-decoder", "clip-vision", "clip-contrast", "unet", "turbo")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def export_clip(model, tokenizer, folder: Path) -> None:
    """Save the full CLIP and its tokenizer to `folder` atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    replace_folder(tmp, folder)


def run_clip(args, arch: ToyArchitecture) -> None:
    """Stage clip: train, report zero-shot accuracy, export."""
    config = ClipTrainConfig(steps=args.clip_steps, seed=args.seed)
    model, tok = train_clip(config, arch, args.workdir / "clip", log=_log)
    test = make_pool(2000, seed=args.seed + 777)
    acc = zero_shot_accuracy(model, tok, test.images, test.factors)
    _log(f"clip zero-shot accuracy: {json.dumps(acc)}")
    export_clip(model, tok, args.workdir / "export" / "clip")
    (args.workdir / "export" / "clip_report.json").write_text(json.dumps(acc, indent=1))


def _finetune_clip(args, arch: ToyArchitecture, stage: str, config: ClipTrainConfig, export: str, report: str) -> None:
    """Fine-tune the exported CLIP as stage `stage`, report its zero-shot accuracy, export it to `export/<export>`."""

    model, tok = train_clip(config, arch, args.workdir / stage, log=_log, init=load_clip(args.workdir / "export" / "clip"))
    test = make_pool(2000, seed=args.seed + 777)
    acc = zero_shot_accuracy(model, tok, test.images, test.factors)
    _log(f"{stage} zero-shot accuracy: {json.dumps(acc)}")
    export_clip(model, tok, args.workdir / "export" / export)
    (args.workdir / "export" / report).write_text(json.dumps(acc, indent=1))
    (args.workdir / "export" / f"{stage}.done").write_text("done\n")


def run_clip_vision(args, arch: ToyArchitecture) -> None:
    """Stage clip-vision: more training of the CLIP's vision side with the text tower frozen.

    The UNet reads only the text tower's hidden states, so this stage can run before, during or
    after the UNet stage without changing what the UNet was trained on.
    """
    config = ClipTrainConfig(steps=args.clip_vision_steps, seed=args.seed + 50, lr=5e-4, warmup=50, freeze_text=True)
    _finetune_clip(args, arch, "clip-vision", config, "clip", "clip_report.json")


def run_clip_contrast(args, arch: ToyArchitecture) -> None:
    """Stage clip-contrast: fine-tune the whole CLIP with contrast groups (scenes that differ only in
    shape, or only in size, with captions naming it), so that both towers tell shapes and sizes apart.

    The text tower changes, so a UNet trained on the old one must be retrained (or warm-started)
    on this one: the export goes to `export/clip-contrast`, which the UNet stage reads with
    `--unet-clip clip-contrast` (the default).
    """
    config = ClipTrainConfig(steps=args.clip_contrast_steps, seed=args.seed + 70, lr=5e-4, warmup=50, contrast=0.5)
    _finetune_clip(args, arch, "clip-contrast", config, "clip-contrast", "clip-contrast_report.json")


def run_vae(args, arch: ToyArchitecture) -> None:
    """Stage vae: train, set the scaling factor, report analyser accuracy on reconstructions, export."""
    config = VaeTrainConfig(steps=args.vae_steps, seed=args.seed)
    vae = train_vae(config, arch, args.workdir / "vae", log=_log)
    report = reconstruction_report(vae)
    _log(f"vae reconstruction (analyser on reconstructions): {json.dumps(report)}")
    folder = args.workdir / "export" / "vae"
    tmp = folder.with_name("vae.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    replace_folder(tmp, folder)
    (args.workdir / "export" / "vae_report.json").write_text(json.dumps(report, indent=1))


def run_vae_decoder(args, arch: ToyArchitecture) -> None:
    """Stage vae-decoder: more training of the decoder alone; the latent space stays as the UNet knows it."""
    from diffusers import AutoencoderKL

    folder = args.workdir / "export" / "vae"
    config = VaeTrainConfig(steps=args.vae_decoder_steps, seed=args.seed + 60, lr=5e-4, warmup=50, decoder_only=True)
    vae = train_vae(config, arch, args.workdir / "vae-decoder", log=_log, init=AutoencoderKL.from_pretrained(folder))
    report = reconstruction_report(vae)
    _log(f"vae-decoder reconstruction (analyser on reconstructions): {json.dumps(report)}")
    tmp = folder.with_name("vae.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    replace_folder(tmp, folder)
    (args.workdir / "export" / "vae_report.json").write_text(json.dumps(report, indent=1))
    (args.workdir / "export" / "vae-decoder.done").write_text("done\n")


def run_unet(args, arch: ToyArchitecture) -> None:
    """Stage unet: train on precomputed latents, exporting the pipeline at each checkpoint."""
    # a coupled line names fewer factors and draws half its batch from the noisier half of the
    # schedule: the noise-to-factor mapping it must learn only matters there, for unnamed factors
    coupled = dict(coupled=True, p_mention=0.5, high_t_share=0.5) if args.unet_coupled else {}
    config = UnetTrainConfig(steps=args.unet_steps, seed=args.seed, checkpoint_every_s=args.checkpoint_every, **coupled)
    train_unet(config, arch, args.workdir, args.output, log=_log, clip_name=args.unet_clip, stage_dir=args.unet_dir,
               init_from=args.unet_init)


def run_turbo(args, arch: ToyArchitecture) -> None:
    """Stage turbo: distil the pipeline in `--teacher` into the few-step `toy-turbo` (DMD2), exporting to `--turbo-output`."""

    lr = {} if args.turbo_lr is None else {"lr_gen": args.turbo_lr, "lr_fake": args.turbo_lr}
    config = TurboTrainConfig(steps=args.turbo_steps, seed=args.seed, checkpoint_every_s=args.checkpoint_every, **lr)
    train_turbo(config, args.teacher, args.workdir, args.turbo_output, log=_log, stage_dir=args.turbo_dir,
                probe=make_probe(args.teacher) if args.turbo_probe else None, init_from=args.turbo_init)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the requested stages."""
    p = OneLineParser(prog="python -m conceptkit.toy.train", description=__doc__)
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run, in order")
    p.add_argument("--workdir", type=Path, default=Path("toy-train"), help="checkpoints and stage exports")
    p.add_argument("--output", type=Path, default=weights_path(), help="where the pipeline is exported")
    p.add_argument("--clip-steps", type=int, default=ClipTrainConfig.steps)
    p.add_argument("--vae-steps", type=int, default=VaeTrainConfig.steps)
    p.add_argument("--vae-decoder-steps", type=int, default=2000)
    p.add_argument("--clip-vision-steps", type=int, default=800)
    p.add_argument("--clip-contrast-steps", type=int, default=800)
    p.add_argument("--unet-steps", type=int, default=60_000)
    p.add_argument("--unet-clip", default="clip-contrast", help="the CLIP export (under WORKDIR/export) whose text tower conditions the UNet")
    p.add_argument("--unet-dir", default="unet-contrast", help="the UNet's checkpoint folder under WORKDIR")
    p.add_argument("--unet-coupled", action="store_true",
                   help="couple the noise to the factors a caption leaves open (conceptkit.toy.coupling)")
    p.add_argument("--unet-init", default=None, help="warm-start from this checkpoint folder under WORKDIR when --unet-dir has none")
    p.add_argument("--turbo-steps", type=int, default=20_000, help="turbo stage: critic steps (the student moves every 4th)")
    p.add_argument("--teacher", type=Path, default=weights_path(), help="turbo stage: the teacher pipeline folder")
    p.add_argument("--turbo-dir", default="turbo", help="turbo stage: the checkpoint folder under WORKDIR")
    p.add_argument("--turbo-output", type=Path, default=weights_path() / "turbo", help="turbo stage: where toy-turbo is exported")
    p.add_argument("--turbo-init", default=None, help="turbo stage: warm-start from this checkpoint folder under WORKDIR when --turbo-dir has none")
    p.add_argument("--turbo-lr", type=float, default=None, help="turbo stage: learning rate of student and critic (default 1e-4)")
    p.add_argument("--no-turbo-probe", dest="turbo_probe", action="store_false",
                   help="turbo stage: skip the quick entropy and fidelity probe after each checkpoint")
    p.add_argument("--checkpoint-every", type=float, default=240.0, help="seconds between UNet checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 on a shared machine (oversubscribed threads ran 5x slower here), 0 for torch's default")
    p.add_argument("--fresh", action="store_true", help="retrain a stage even if its export exists (resumes its checkpoint)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        p.error(f"unknown stages {bad}; choose from {STAGES}")
    if "turbo" in stages:
        if args.turbo_steps <= 0:
            p.error(f"--turbo-steps must be positive, got {args.turbo_steps}")
        if not (args.teacher / "model_index.json").is_file():
            p.error(f"--teacher {args.teacher}: no pipeline folder there (model_index.json missing)")
        if args.turbo_lr is not None and not args.turbo_lr > 0:
            p.error(f"--turbo-lr must be positive, got {args.turbo_lr}")
        if args.turbo_init is not None and not (args.workdir / args.turbo_init / "latest.json").is_file():
            p.error(f"--turbo-init {args.turbo_init}: no checkpoint in {args.workdir / args.turbo_init}")
        if args.turbo_output.resolve() == args.teacher.resolve():
            p.error("--turbo-output must not be the teacher's own folder")
    arch = ToyArchitecture()
    for stage in STAGES:
        if stage not in stages:
            continue
        marker = args.workdir / "export" / (f"{stage}.done" if stage in ("clip-vision", "clip-contrast", "vae-decoder") else stage)
        if stage not in ("unet", "turbo") and marker.exists() and not args.fresh:
            _log(f"{stage}: export exists, skipping (use --fresh to retrain)")
            continue
        _log(f"{stage}: start")
        {"clip": run_clip, "vae": run_vae, "vae-decoder": run_vae_decoder, "clip-vision": run_clip_vision,
         "clip-contrast": run_clip_contrast, "unet": run_unet, "turbo": run_turbo}[stage](args, arch)
        _log(f"{stage}: done")


if __name__ == "__main__":
    main()
