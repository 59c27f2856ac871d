"""Teacher against `toy-turbo`: factor entropy of "a shape" and fidelity, `python -m conceptkit.toy.turbo_quality`.

Both models are measured with `toy.quality.measure` (the toy analyser): fidelity on fully specified
prompts, normalised entropy of each factor over the readable images of "a shape". The teacher
samples with its defaults (20 DDIM steps, guidance 3); the student with its own steps and no
guidance (the guidance is folded into it).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from conceptkit.toy.analyse import analyse_batch
from conceptkit.toy.model import sampling_defaults, weights_path
from conceptkit.toy.parser import OneLineParser
from conceptkit.toy.quality import QualityConfig, fidelity, generate, measure, normalised_entropy
from conceptkit.toy.turbo import GUIDANCE, build_turbo_scheduler, turbo_path
from conceptkit.toy.world import FACTORS, caption, sample_scenes

COLLAPSE_BAR = 0.6  # "a shape": normalised entropy at most this on at least two factors
FIDELITY_BAR = 0.9  # fully specified prompts: shape and colour at least this


def bars(report: dict) -> dict[str, bool]:
    """The issue's bars on one model's report (`QualityReport` as a dict)."""
    low = [k for k, v in report["diversity"].items() if v <= COLLAPSE_BAR]
    return {"collapsed": len(low) >= 2, "fidelity": min(report["fidelity"]["shape"], report["fidelity"]["colour"]) >= FIDELITY_BAR}


def probe_pipeline(student, teacher_dir: Path):
    """A `StableDiffusionPipeline` of the student in memory, with the teacher's VAE, text tower and tokenizer."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(teacher_dir / "vae").eval(), text_encoder=CLIPTextModel.from_pretrained(teacher_dir / "text_encoder").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(teacher_dir / "tokenizer"), unet=student, scheduler=build_turbo_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_probe(teacher_dir: Path, n: int = 128, steps: int = 1):
    """A quick measurement for the training log: entropy of "a shape" and fidelity, n images each, at `steps` steps."""
    scenes = sample_scenes(n, seed=10_000)
    pipe_cache: dict = {}

    @torch.no_grad()
    def probe(student) -> str:
        was_training = student.training
        student.eval()
        if "pipe" not in pipe_cache:
            pipe_cache["pipe"] = probe_pipeline(student, Path(teacher_dir))
        pipe = pipe_cache["pipe"]
        pipe.unet = student
        fid = fidelity(analyse_batch(generate(pipe, [caption(s) for s in scenes], list(range(n)), steps, GUIDANCE, n)), scenes)
        readings = [r for r in analyse_batch(generate(pipe, ["a shape"] * n, list(range(50_000, 50_000 + n)), steps, GUIDANCE, n)) if r.valid]
        ent = {k: round(normalised_entropy([r.factors[k] for r in readings], v), 3) for k, v in FACTORS.items()}
        student.train(was_training)
        return json.dumps({"fidelity": {k: round(v, 3) for k, v in fid.items()}, "entropy": ent, "valid_a_shape": len(readings) / n})

    return probe


def table(rows: list[tuple[str, dict]]) -> str:
    """A markdown table of entropy and fidelity per factor, one pair of rows per model."""
    names = list(FACTORS)
    lines = ["| model | measure | " + " | ".join(names) + " | readable |", "|---|---|" + "---|" * (len(names) + 1)]
    for label, r in rows:
        lines.append(f"| {label} | entropy of \"a shape\" | " + " | ".join(f"{r['diversity'][k]:.3f}" for k in names)
                     + f" | {r['diversity_valid']:.3f} |")
        lines.append(f"| {label} | fidelity | " + " | ".join(f"{r['fidelity'][k]:.3f}" for k in names) + f" | {r['valid']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: JSON on stdout, the markdown table on stderr."""
    d = sampling_defaults()
    p = OneLineParser(prog="python -m conceptkit.toy.turbo_quality", description=__doc__)
    p.add_argument("--teacher", type=Path, default=weights_path())
    p.add_argument("--turbo", type=Path, default=turbo_path())
    p.add_argument("--turbo-steps", default="1,2,4", help="comma-separated student step counts to measure")
    p.add_argument("--prompts", type=int, default=200, help="fully specified prompts (fidelity)")
    p.add_argument("--seeds", type=int, default=256, help="images of \"a shape\" (entropy)")
    p.add_argument("--no-teacher", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    try:
        steps = [int(s) for s in a.turbo_steps.split(",") if s.strip()]
    except ValueError:
        p.error(f"--turbo-steps wants integers, got {a.turbo_steps!r}")
    if not steps or any(not 1 <= s <= 4 for s in steps):
        p.error("--turbo-steps: each step count in 1..4")
    if a.prompts < 1 or a.seeds < 2:
        p.error("--prompts >= 1 and --seeds >= 2")
    for folder in ([] if a.no_teacher else [a.teacher]) + [a.turbo]:
        if not (folder / "model_index.json").exists():
            p.error(f"no pipeline at {folder}")
    if a.threads:
        torch.set_num_threads(a.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    provenance = a.turbo / "training.json"  # read first: a training run may re-export the folder meanwhile
    trained = json.loads(provenance.read_text()) if provenance.exists() else None
    rows = []
    if not a.no_teacher:
        cfg = QualityConfig(prompts=a.prompts, diversity_images=a.seeds, steps=d.get("steps", 20), guidance=d.get("guidance", 3.0),
                            clip_images=0, speed=False)
        rows.append((f"teacher `toy`, {cfg.steps} steps, guidance {cfg.guidance:g}", asdict(measure(cfg, a.teacher, log=log))))
    for s in steps:
        cfg = QualityConfig(prompts=a.prompts, diversity_images=a.seeds, steps=s, guidance=GUIDANCE, clip_images=0, speed=False)
        rows.append((f"`toy-turbo`, {s} step{'s' if s > 1 else ''}", asdict(measure(cfg, a.turbo, log=log))))
    out = [{"model": label, "bars": bars(r), **{k: r[k] for k in ("fidelity", "valid", "diversity", "diversity_valid", "config")}}
           for label, r in rows]
    if (json.loads(provenance.read_text()) if provenance.exists() else None) != trained:
        print(f"error: {a.turbo} was re-exported during the measurement; measure a copy, or when training has stopped",
              file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"rows": out, "turbo_training": trained}, indent=1))
    log(table(rows))


if __name__ == "__main__":
    main()
