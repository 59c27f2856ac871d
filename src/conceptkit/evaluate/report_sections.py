"""The sections of an evaluation report, one function per kind: (title, HTML sections, {name: PNG path})."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from conceptkit.evaluate.page import fmt, img, html_table
from conceptkit.evaluate.toy_factors import ROW_TITLES
from conceptkit.figures import bars, curves, heatmap, image_grid


def _set_rows(doc: dict[str, Any], names: list[tuple[str, str]]) -> list[list[Any]]:
    return [[label, doc[k]["n"], doc[k]["diversity"], doc[k]["vendi"], doc[k]["clip_score"]] for k, label in names]


def _with_ci(v: Any, ci: list[float] | None, fmt) -> str | None:
    """'value [low, high]' (None without a value; the table shows a dash)."""
    return None if v is None else fmt(v) + ("" if ci is None else f" [{fmt(ci[0])}, {fmt(ci[1])}]")


SET_COLUMNS = ["set", "images", "diversity (mean cosine distance)", "Vendi score", "CLIP score"]


def sliders_section(doc: dict[str, Any], arrays: dict[str, np.ndarray], folder: Path) -> tuple[str, list[str], dict[str, str]]:
    files: dict[str, str] = {}
    level = f"{100 * doc.get('ci_level', 0.95):g}%"
    labels = [f"{s['index']}:{s['label']}" for s in doc["per_slider"]]
    shown = min(32, doc["count"])
    files["base_grid"] = image_grid(folder / "base.png", arrays["base_images"][:shown], f"base model, seeds {doc['seed']}..")
    files["slider_grid"] = image_grid(folder / "sliders.png", arrays["slider_images"][:shown],
                                      f"{doc['per_image']} random sliders per image, same seeds")
    n = min(3, doc["effect_count"])
    k = len(labels)
    if k:
        cells = np.stack([np.stack([arrays["effect_minus_images"][j, i], arrays["base_images"][i], arrays["effect_plus_images"][j, i]])
                          for j in range(k) for i in range(n)]).reshape(k * n * 3, *arrays["base_images"].shape[1:])
        s = doc["effect_strength"]
        files["sweep_grid"] = image_grid(folder / "strength-sweep.png", cells, f"each slider at -{s:g}, 0, +{s:g} ({n} seeds)",
                                         cols=3 * n, row_labels=labels, col_labels=[f"{v:+g}" for _ in range(n) for v in (-s, 0, s)])
        files["effect_cosines"] = heatmap(folder / "effect-cosines.png", np.array(doc["effect_cosines"]),
                                          "cosine between sliders' mean effects", labels)
        files["effect_sizes"] = bars(folder / "effect-sizes.png", labels,
                                     {f"+{s:g}": [r["effect_size"] for r in doc["per_slider"]],
                                      f"-{s:g}": [r["effect_size_minus"] for r in doc["per_slider"]]},
                                     "effect size: mean embedding shift from the base image", "mean ||shift||")
    sections = [
        html_table("diversity and alignment", SET_COLUMNS, _set_rows(doc, [("base", "base model"), ("sliders", "random sliders")])),
        html_table(f"comparison (sliders / base; [{level} paired bootstrap interval over the seeds])",
               ["Fréchet distance (base vs sliders)", "diversity ratio", "Vendi ratio", "CLIP score change"],
               [[doc["frechet_distance"], _with_ci(doc["diversity_ratio"], doc.get("diversity_ratio_ci"), fmt),
                 _with_ci(doc["vendi_ratio"], doc.get("vendi_ratio_ci"), fmt),
                 _with_ci(doc["clip_score_change"], doc.get("clip_score_change_ci"), lambda v: f"{100 * v:+.2f}%")]]),
        f"<p class=\"note\">Higher diversity with sliders ({level} interval of the diversity ratio above 1): "
        f"{fmt(doc.get('diversity_higher'))}. CLIP score within 5% ({level} interval of its change inside ±5%): "
        f"{fmt(doc.get('clip_within_5pct'))}.</p>",
    ]
    if not doc["clip_available"]:
        sections.append(f"<p class=\"note\">CLIP score unavailable: {html.escape(str(doc['clip_note']))}</p>")
    r, t = doc.get("random_baseline"), doc.get("teacher")
    if r:
        sections.append(html_table(f"baseline: the same combinations on random rank-1 directions of the sliders' norms ([{level} interval])",
                                   ["diversity ratio", "Vendi ratio", "CLIP score change"],
                                   [[_with_ci(r["diversity_ratio"], r.get("diversity_ratio_ci"), fmt),
                                     _with_ci(r["vendi_ratio"], r.get("vendi_ratio_ci"), fmt),
                                     _with_ci(r.get("clip_score_change"), r.get("clip_score_change_ci"), lambda v: f"{100 * v:+.2f}%")]]))
    if t:
        fd = t["frechet_distance"]
        sections.append(html_table(f"Fréchet distance to the teacher {t['model']['spec']} ({t['steps']} steps, guidance {t['guidance']:g}, same seeds)",
                                   ["base", "sliders", "random directions", "the teacher's two halves (floor)"],
                                   [[fd["base"], fd["sliders"], fd.get("random_baseline"), fd["floor"]]]))
    sections += [img(files["base_grid"], "base model"), img(files["slider_grid"], "random sparse sliders")]
    if k:
        sections.append(html_table("per slider", ["index", "label", f"effect size (+{doc['effect_strength']:g})",
                                              f"effect size (-{doc['effect_strength']:g})"],
                               [[r["index"], r["label"], r["effect_size"], r["effect_size_minus"]] for r in doc["per_slider"]]))
        sections += [img(files["sweep_grid"], "strength sweep"), img(files["effect_cosines"], "effect cosines"),
                     img(files["effect_sizes"], "effect sizes")]
    t = doc.get("factor_table")
    if t:
        floor = ", ".join(f"{g} {v:.3f}" for g, v in t["floor"].items())
        sections.append(html_table(f"factor table (toy analyser), {t['seeds']} seeds at ±{doc['effect_strength']:g}: per-seed purity "
                               f"beside the mean summed change; distribution purity beside the main factor's TV distance above "
                               f"the noise floor ({floor}; two {t['seeds']}-seed halves of {t['base_seeds']} base seeds)",
                               ["row", "per-seed purity", "summed change", "distribution purity", "effect above floor",
                                "above floor", f"effect ≥ {t['rows']['sliders']['distribution']['strong']:g}", "consistency",
                                "core factors covered", "labels naming the main factor"],
                               [[ROW_TITLES[name], s["per_seed_purity"], s["per_seed_change"], s["distribution_purity"],
                                 s["main_effect"], f"{s['n_above_floor']} of {s['count']}", f"{s['n_strong']} of {s['count']}",
                                 s["consistency"], f"{s['coverage']} of 4", f"{s['labels_right']} of {s['count']}"]
                                for name, s in ((n, r["summary"]) for n, r in t["rows"].items())]))
        for name, row in t["rows"].items():
            d = row["distribution"]
            sections.append(html_table(f"{ROW_TITLES[name]}: TV distance between -{doc['effect_strength']:g} and "
                                   f"+{doc['effect_strength']:g} per factor (effect above the floor)",
                                   ["index", "label", "main factor", "distribution purity", "effect", "toward + value", "+ value",
                                    *d["factors"]],
                                   [[r["index"], r["label"], r["main"], r["distribution_purity"], r["main_effect"], r["toward"],
                                     r["plus_value"], *(f"{fmt(r['tv'][x])} ({fmt(r['effect'][x])})" for x in d["factors"])]
                                    for r in d["per_slider"]]))
    f = doc.get("factors")
    if f:
        sections.append(html_table(f"factor recovery (toy analyser): {f['n_covered']} of {len(f['of'])} factors covered "
                               f"({', '.join(f['coverage'])}), mean purity {f['mean_purity']:.3f}, labels naming the main factor "
                               f"{f['labels_right']} of {len(f['per_slider'])}",
                               ["index", "label", "main factor", "purity", "read validly", *f["factors"]],
                               [[r["index"], r["label"], r["main"], r["purity"], r["valid"], *(r["change"][x] for x in f["factors"])]
                                for r in f["per_slider"]]))
    fe = doc.get("factor_entropy")
    if fe:
        names = list(fe["base"]["entropy"])
        sections.append(html_table("how evenly each set spreads over the toy's factors (normalised entropy of the analyser's readings; "
                               "1 = uniform)", ["set", "read validly", *names],
                               [[label, fe[key]["valid"], *(fe[key]["entropy"][x] for x in names)]
                                for key, label in (("base", "base model"), ("sliders", "random sliders"))]))
    return f"sliders {doc['set']} ({doc['prompt']!r}, {doc['model']['spec']})", sections, files


def images_section(doc: dict[str, Any], arrays: dict[str, np.ndarray], folder: Path) -> tuple[str, list[str], dict[str, str]]:
    files = {"a_grid": image_grid(folder / "a.png", arrays["a_images"][:32], f"A: {doc['a']['folder']}")}
    names = [("a", "A")]
    if doc.get("b"):
        files["b_grid"] = image_grid(folder / "b.png", arrays["b_images"][:32], f"B: {doc['b']['folder']}")
        names.append(("b", "B"))
    sections = [html_table("diversity and alignment" + (f" with {doc['prompt']!r}" if doc.get("prompt") else ""), SET_COLUMNS,
                       _set_rows(doc, names))]
    if doc.get("b"):
        sections.append(html_table("comparison", ["Fréchet distance (A vs B)"], [[doc["frechet_distance"]]]))
    if not doc["clip_available"]:
        sections.append(f"<p class=\"note\">CLIP score unavailable: {html.escape(str(doc['clip_note']))}</p>")
    sections += [img(p, f"first images of {'A' if n == 'a_grid' else 'B'}") for n, p in files.items()]
    return "images" + (f" {doc['a']['folder']} vs {doc['b']['folder']}" if doc.get("b") else f" {doc['a']['folder']}"), sections, files


def cluster_section(doc: dict[str, Any], arrays: dict[str, np.ndarray], folder: Path) -> tuple[str, list[str], dict[str, str]]:
    files: dict[str, str] = {}
    k, n = doc["k"], doc["per_subconcept"]
    imgs = arrays["images"]
    m = min(imgs.shape[1], 8)
    cells = np.concatenate([arrays["base_images"][None, :m], imgs[:, :m]]).reshape(-1, *imgs.shape[-3:])
    files["subconcept_grid"] = image_grid(folder / "subconcepts.png", cells, f"images per sub-concept (mode {doc['mode']}), same seeds",
                                          cols=m, row_labels=["unmodified"] + [f"sub-concept {c}" for c in range(k)])
    if "similarity_jaccard" in arrays:
        t = arrays["similarity_jaccard"]
        files["heatmap"] = heatmap(folder / "timestep-similarity.png", t, "Jaccard similarity of kept neurons per timestep",
                                   [str(x) for x in doc.get("timesteps", [])] or None, vmin=-1, vmax=1, annotate=False)
    sweeps = doc.get("sweeps") or {}
    if sweeps.get("k"):
        pts = sweeps["k"]
        files["elbow"] = curves(folder / "elbow.png", [p["value"] for p in pts],
                                {m: [p["metrics"][m] if p.get("metrics") else None for p in pts]
                                 for m in ("calinski_harabasz", "davies_bouldin", "silhouette", "fpc")}, "k", "elbow over k")
    if sweeps.get("tau"):
        pts = sweeps["tau"]
        files["tau_curve"] = curves(folder / "tau-curve.png", [p["value"] for p in pts],
                                    {"fpc": [p["metrics"]["fpc"] if p.get("metrics") else None for p in pts],
                                     "clustering seconds": [p["metrics"]["seconds"] if p.get("metrics") else None for p in pts],
                                     "kept": [p["n_neurons_kept"] for p in pts]}, "tau", "tau curve")
    v = doc["vbsc"]
    sections = [html_table("VbSC: the sub-concepts' images as a clustering", ["sub-concepts", "images each", "Calinski-Harabasz",
                                                                          "Davies-Bouldin", "silhouette"],
                       [[k, n, v["calinski_harabasz"], v["davies_bouldin"], v["silhouette"]]]),
                html_table("per sub-concept", ["sub-concept", "kept neurons", "diversity", "Vendi score", "CLIP score", "shift from unmodified"],
                       [[r["cluster"], size, r["diversity"], r["vendi"], r["clip_score"], r["shift_from_base"]]
                        for r, size in zip(doc["per_subconcept_scores"], doc["sizes"])]
                       + [["unmodified", None, doc["base"]["diversity"], doc["base"]["vendi"], doc["base"]["clip_score"], None]])]
    if doc.get("neuron_clustering"):
        nc = doc["neuron_clustering"]
        sections.append(html_table("the neurons' own clustering (from `conceptkit cluster`)", ["Calinski-Harabasz", "Davies-Bouldin",
                                                                                           "silhouette", "FPC"],
                               [[nc.get("calinski_harabasz"), nc.get("davies_bouldin"), nc.get("silhouette"), nc.get("fpc")]]))
    captions = {"subconcept_grid": "rows: the unmodified images, then each sub-concept on the same seeds",
                "heatmap": "timestep similarity (Jaccard of the kept neurons)", "elbow": "elbow over k (the neurons' clustering)",
                "tau_curve": "tau curve: FPC, clustering time and neurons kept"}
    sections += [img(p, captions[name]) for name, p in files.items()]
    missing = [w for w, have in (("heatmap", "heatmap" in files), ("elbow (run `conceptkit cluster --sweep-k`)", "elbow" in files),
                                 ("tau curve (run `conceptkit cluster --sweep-tau`)", "tau_curve" in files)) if not have]
    if missing:
        sections.append(f"<p class=\"note\">not in the cluster artifact: {html.escape(', '.join(missing))}</p>")
    return f"cluster {doc['cluster']} ({doc['prompt']!r})", sections, files
