"""`conceptkit evaluate sliders|images|cluster`: the papers' measurements, as tables, JSON and a report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from conceptkit import ui
from conceptkit.cli.common import DeviceOpt, JsonOpt, ModelOpt, app, command, open_model
from conceptkit.errors import UsageError

evaluate_app = typer.Typer(no_args_is_help=True, help="Measure slider sets, clusterings and image folders: diversity, CLIP score, "
                                                      "Fréchet distance, cluster scores; tables, --json and --report DIR.")
app.add_typer(evaluate_app, name="evaluate")

EncoderOpt = Annotated[Optional[str], typer.Option(help="auto, pixel[:side], toy, clip:<id or folder>, dinov2:<id or folder>.",
                                                   show_default=False)]
ReportOpt = Annotated[Optional[Path], typer.Option(help="Write PNG plots and a self-contained report.html to this folder.",
                                                   show_default=False)]
SeedOpt = Annotated[int, typer.Option(help="First seed; also seeds the random choices.")]


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _finish(doc: dict, report: Path | None, json_out: bool, render) -> None:
    """Write the report (from the saved arrays), then print JSON on stdout or tables on stderr."""
    if report is not None:
        from conceptkit.evaluate import common as evaluation  # deferred: --help loads no torch
        from conceptkit.evaluate import report as rep  # deferred: --help loads no torch

        doc["report"] = rep.write(doc, evaluation.load_arrays(doc), report)
    if json_out:
        ui.print_json(doc)
        return
    render(doc)
    ui.info(f"key {doc['key']}  {doc['path']}" + ("  (cached)" if doc["cached"] else f"  {doc['seconds']:.0f}s")
            + (f"\nreport {doc['report']['html']}" if report is not None else ""))


def _ratio(v: float) -> str:  # ratios near 1: a fixed number of decimals, so 1.0000 does not print as "1"
    return f"{v:.4f}"


def _with_ci(v, ci, fmt) -> str:
    """'value [low, high]', or '-' without a value."""
    return "-" if v is None else fmt(v) + ("" if ci is None else f" [{fmt(ci[0])}, {fmt(ci[1])}]")


def _set_table(title: str, rows) -> None:
    ui.table(title, ["set", "images", "diversity", "vendi", "clip score"],
             [(name, d["n"], _fmt(d["diversity"]), _fmt(d["vendi"]), _fmt(d["clip_score"])) for name, d in rows])


@evaluate_app.command("sliders")
@command
def sliders(
    name: Annotated[str, typer.Argument(help="Slider set name (see `conceptkit sliders list`), or a kohya/peft LoRA .safetensors file (one slider).", show_default=False)],
    model: ModelOpt = None,
    prompt: Annotated[Optional[str], typer.Option(help="For a LoRA file: the concept it slides, e.g. 'a person'. Default: the --like set's.", show_default=False)] = None,
    like: Annotated[Optional[str], typer.Option(help="For a LoRA file: take prompt, steps, guidance, encoder and model from this slider set, so both are drawn on the same seeds.", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="For a LoRA file: denoising steps. Default: the --like set's, else the model's.", show_default=False)] = None,
    guidance: Annotated[Optional[float], typer.Option(help="For a LoRA file: guidance scale. Default: the --like set's, else the model's.", show_default=False)] = None,
    start: Annotated[Optional[float], typer.Option(help="For a LoRA file: it acts from this fraction of the steps on. Default: 0 (from the first step, as plain loaders apply it).", show_default=False)] = None,
    count: Annotated[int, typer.Option("--count", "-n", help="Images per side: N base images and N with random sliders.")] = 64,
    per_image: Annotated[int, typer.Option(help="Sliders in each image's random combination.")] = 3,
    scale: Annotated[float, typer.Option(help="Random strengths are uniform in [-scale, scale].")] = 2.0,
    effect_count: Annotated[int, typer.Option(help="Seeds per slider drawn at -/+ --effect-strength (effect sizes, factor table).")] = 16,
    effect_strength: Annotated[float, typer.Option(help="Strength of the per-slider effect images.")] = 2.0,
    factor_seeds: Annotated[int, typer.Option(help="Toy only: seeds of the factor table (sliders, random directions, prompt "
                                                   "edits at -/+ --effect-strength; twice as many base seeds for the noise floor).")] = 64,
    encoder: EncoderOpt = None,
    random_baseline: Annotated[bool, typer.Option("--random-baseline", help="Also draw the same random combinations with random rank-1 directions of the sliders' norms (the baseline that should lose).")] = False,
    teacher: Annotated[Optional[str], typer.Option(help="A reference model, e.g. the one a distilled --model was made from: the Fréchet distance of the base and the slider images to its images on the same seeds.", show_default=False)] = None,
    seed: SeedOpt = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per sampling call.")] = 32,
    report: ReportOpt = None,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """SliderSpace's concept decomposition: base vs random sparse sliders (diversity, CLIP score, FD), per-slider effects."""
    from conceptkit.evaluate.sliders import SliderEvalConfig, run  # deferred: --help loads no torch
    from conceptkit.sliders.sets import load_set  # deferred: --help loads no torch

    from conceptkit.evaluate.lora import is_lora_file, lora_file_set, precheck, settings_for  # deferred: --help loads no torch

    cfg = SliderEvalConfig(count=count, per_image=per_image, scale=scale, effect_count=effect_count,
                           effect_strength=effect_strength, factor_seeds=factor_seeds, seed=seed, encoder=encoder,
                           batch_size=batch_size, random_baseline=random_baseline)
    if is_lora_file(name):
        precheck(name, prompt, like, start)
        like_set = load_set(like) if like is not None else None
        loaded = open_model(model or (like_set.manifest["model"]["spec"] if like_set else None), device, "auto", None,
                      encoders=[encoder or (like_set.manifest["encoder"] if like_set else "auto")])
        sset = lora_file_set(loaded, name, settings_for(loaded, like_set, prompt, steps, guidance, start))
    else:
        if any(v is not None for v in (prompt, like, steps, guidance, start)):
            raise UsageError("--prompt, --like, --steps, --guidance and --start apply to a LoRA file; a set has its own")
        sset = load_set(name)
        loaded = open_model(model or sset.manifest["model"]["spec"], device, "auto", None, encoders=[encoder or sset.manifest["encoder"]])
    reference = open_model(teacher, device, "auto", None) if teacher is not None else None
    with ui.progress("evaluate sliders", unit="images", enabled=not json_out or sys.stderr.isatty()) as bar:
        def progress(stage, done, total):
            bar(done, total, stage=stage)

        doc = run(loaded, sset, cfg, progress=progress, on_wait=ui.info, teacher=reference)
    _finish(doc, report, json_out, _render_sliders)


def _render_sliders(doc: dict) -> None:
    _set_table(f"sliders {doc['set']}: {doc['count']} images per side, encoder {doc['encoder']}",
               [("base", doc["base"]), (f"{doc['per_image']} random sliders", doc["sliders"])])
    level = f"{100 * doc.get('ci_level', 0.95):g}%"
    ui.table(f"comparison (sliders / base; [{level} paired bootstrap interval over the seeds])",
             ["frechet distance", "diversity ratio", "vendi ratio", "clip score change"],
             [(_fmt(doc["frechet_distance"]), _with_ci(doc["diversity_ratio"], doc.get("diversity_ratio_ci"), _ratio),
               _with_ci(doc["vendi_ratio"], doc.get("vendi_ratio_ci"), _ratio),
               _with_ci(doc["clip_score_change"], doc.get("clip_score_change_ci"), lambda v: f"{100 * v:+.2f}%"))])
    verdict = {True: "yes", False: "no", None: "-"}
    ui.info(f"higher diversity with sliders ({level} interval of the ratio above 1): {verdict[doc.get('diversity_higher')]}; "
            f"clip score within 5% ({level} interval of the change inside +/-5%): {verdict[doc.get('clip_within_5pct')]}")
    if not doc["clip_available"]:
        ui.info(f"clip score unavailable: {doc['clip_note']}")
    if doc.get("random_baseline"):
        r = doc["random_baseline"]
        ui.table("random rank-1 directions, same norms and strengths (the baseline)", ["diversity ratio", "vendi ratio"],
                 [(_with_ci(r["diversity_ratio"], r.get("diversity_ratio_ci"), _ratio), _with_ci(r["vendi_ratio"], r.get("vendi_ratio_ci"), _ratio))])
    if doc.get("teacher"):
        t = doc["teacher"]
        fd = t["frechet_distance"]
        ui.table(f"against the teacher {t['model']['spec']} ({t['steps']} steps, guidance {t['guidance']:g}; same seeds)",
                 ["frechet distance: base", "sliders", "random directions", "teacher's two halves (floor)"],
                 [(_fmt(fd["base"]), _fmt(fd["sliders"]), _fmt(fd.get("random_baseline")), _fmt(fd["floor"]))])
    ui.table(f"per slider (effect at +/-{doc['effect_strength']:g} on {doc['effect_count']} seeds; mean |off-diagonal cosine| "
             f"{_fmt(doc['mean_abs_off_diagonal_cosine'])})", ["index", "label", "effect +", "effect -", "max |cos| with another"],
             [(r["index"], r["label"], _fmt(r["effect_size"]), _fmt(r["effect_size_minus"]),
               _fmt(max((abs(c) for j, c in enumerate(doc["effect_cosines"][i]) if j != i), default=None)))
              for i, r in enumerate(doc["per_slider"])])
    t = doc.get("factor_table")
    if t:
        from conceptkit.evaluate.toy_factors import ROW_TITLES  # deferred: --help loads no torch

        ui.table(f"factor table (toy analyser; {t['seeds']} seeds at -/+{doc['effect_strength']:g}; noise floor from "
                 f"{t['base_seeds']} base seeds: " + ", ".join(f"{g} {v:.3f}" for g, v in t["floor"].items()) + ")",
                 ["row", "per-seed purity", "change", "distribution purity", "effect", "above floor", "strong", "consistency",
                  "covered", "labels"],
                 [(ROW_TITLES[name], _fmt(s["per_seed_purity"]), _fmt(s["per_seed_change"]), _fmt(s["distribution_purity"]),
                   _fmt(s["main_effect"]), f"{s['n_above_floor']}/{s['count']}", f"{s['n_strong']}/{s['count']}", _fmt(s["consistency"]),
                   f"{s['coverage']}/4", f"{s['labels_right']}/{s['count']}")
                  for name, s in ((n, r["summary"]) for n, r in t["rows"].items())])
        for name, row in t["rows"].items():
            d, p = row["distribution"], row["per_seed"]
            ui.table(f"{ROW_TITLES[name]}: TV distance at -/+ (effect above the floor); per-seed change",
                     ["index", "label", "main", "distribution purity", "effect", "toward", "+ value", *d["factors"],
                      "per-seed main", "per-seed purity"],
                     [(r["index"], r["label"], r["main"] or "-", _fmt(r["distribution_purity"]), _fmt(r["main_effect"]), _fmt(r["toward"]),
                       r["plus_value"] or "-", *(f"{_fmt(r['tv'][x])} ({_fmt(r['effect'][x])})" for x in d["factors"]),
                       q["main"] or "-", _fmt(q["purity"])) for r, q in zip(d["per_slider"], p["per_slider"])])
    fe = doc.get("factor_entropy")
    if fe:
        names = list(fe["base"]["entropy"])
        ui.table("factor entropy (toy analyser; 1 = uniform over the factor's values)", ["set", "valid", *names],
                 [(label, _fmt(fe[key]["valid"]), *(_fmt(fe[key]["entropy"][x]) for x in names))
                  for key, label in (("base", "base"), ("sliders", "random sliders"))])


@evaluate_app.command("images")
@command
def images(
    a: Annotated[Path, typer.Argument(help="A folder of PNG/JPG images.", show_default=False)],
    b: Annotated[Optional[Path], typer.Argument(help="A second folder: the Fréchet distance A vs B.", show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Score the images' CLIP alignment with this prompt.", show_default=False)] = None,
    encoder: Annotated[str, typer.Option(help="auto (the toy CLIP), pixel[:side], toy, clip:<id or folder>, dinov2:<id or folder>.")] = "auto",
    report: ReportOpt = None,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Fréchet distance, diversity and CLIP score of your own image folders."""
    from conceptkit.evaluate.common import run_images  # deferred: --help loads no torch
    from conceptkit.models.load import resolve_device  # deferred: --help loads no torch

    with ui.progress("evaluate images", unit="images", enabled=not json_out or sys.stderr.isatty()) as bar:
        doc = run_images(a, b, prompt, encoder, device=resolve_device(device), progress=bar, on_wait=ui.info)
    _finish(doc, report, json_out, _render_images)


def _render_images(doc: dict) -> None:
    rows = [(f"A {doc['a']['folder']}", doc["a"])] + ([(f"B {doc['b']['folder']}", doc["b"])] if doc.get("b") else [])
    _set_table(f"images, encoder {doc['encoder']}" + (f", prompt {doc['prompt']!r}" if doc.get("prompt") else ""), rows)
    if doc.get("b"):
        ui.table("comparison", ["frechet distance (A vs B)"], [(_fmt(doc["frechet_distance"]),)])
    if not doc["clip_available"]:
        ui.info(f"clip score unavailable: {doc['clip_note']}")


@evaluate_app.command("cluster")
@command
def cluster(
    key: Annotated[str, typer.Argument(help="Cluster artifact key or prefix (from `conceptkit cluster ... --json | jq .key`).", show_default=False)],
    model: ModelOpt = None,
    count: Annotated[int, typer.Option("--count", "-n", help="Images per sub-concept (the same seeds for each).")] = 16,
    mode: Annotated[str, typer.Option(help="only (every other kept neuron closed), close (this sub-concept's closed) or scale.")] = "only",
    scale: Annotated[float, typer.Option(help="Output multiplier of the sub-concept's neurons in mode scale.")] = 0.0,
    encoder: EncoderOpt = None,
    seed: SeedOpt = 0,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps. Default: the model's.", show_default=False)] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale. Default: the model's.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per sampling call.")] = 32,
    report: ReportOpt = None,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Picasso's VbSC: render each sub-concept, embed, score as a clustering; elbow, tau curve, heatmap from the artifact."""
    from conceptkit.evaluate.cluster import ClusterEvalConfig, cluster_model_spec, run  # deferred: --help loads no torch

    cfg = ClusterEvalConfig(per_subconcept=count, mode=mode, scale=scale, seed=seed, encoder=encoder, steps=steps,
                            guidance=guidance, batch_size=batch_size)
    loaded = open_model(model or cluster_model_spec(key), device, "auto", None, encoders=[encoder or "auto"])
    with ui.progress("evaluate cluster", unit="sub-concepts", enabled=not json_out or sys.stderr.isatty()) as bar:
        doc = run(loaded, key, cfg, progress=lambda stage, done, total: bar(done, total, stage=stage), on_wait=ui.info)
    _finish(doc, report, json_out, _render_cluster)


def _render_cluster(doc: dict) -> None:
    v = doc["vbsc"]
    ui.table(f"VbSC of cluster {doc['cluster']} ({doc['prompt']!r}): {doc['k']} sub-concepts x {doc['per_subconcept']} images, "
             f"mode {doc['mode']}, encoder {doc['encoder']}", ["calinski-harabasz", "davies-bouldin", "silhouette"],
             [(_fmt(v["calinski_harabasz"]), _fmt(v["davies_bouldin"]), _fmt(v["silhouette"]))])
    ui.table("per sub-concept", ["sub-concept", "kept neurons", "diversity", "vendi", "clip score", "shift from unmodified"],
             [(r["cluster"], size, _fmt(r["diversity"]), _fmt(r["vendi"]), _fmt(r["clip_score"]), _fmt(r["shift_from_base"]))
              for r, size in zip(doc["per_subconcept_scores"], doc["sizes"])])
    for name, points in doc["sweeps"].items():
        ui.table(f"from the cluster artifact: sweep over {name}", [name, "calinski-harabasz", "davies-bouldin", "silhouette", "fpc", "seconds"],
                 [(_fmt(p["value"]), *(_fmt((p.get("metrics") or {}).get(m)) for m in ("calinski_harabasz", "davies_bouldin", "silhouette", "fpc", "seconds")))
                  for p in points])
    missing = [w for w, have in doc["has"].items() if not have]
    if missing:
        ui.info(f"not in the cluster artifact: {', '.join(missing)} (run `conceptkit cluster` with --sweep-k / --sweep-tau)")
