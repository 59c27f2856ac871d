"""The slider window in ComfyUI (hook keyframes) and A1111 (sd-webui-loractl), and A1111's infotext in our PNGs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conceptkit import store
from conceptkit.cli import app
from conceptkit.infotext import Infotext, format_infotext, parse_infotext
from conceptkit.diffusion import window_steps as first_step
from conceptkit.sliders.clients import comfy_start_percent, loractl_tag
from _sets import train_tiny_set
from _cli import one_line_error

runner = CliRunner()
NODES = json.loads((Path(__file__).parent / "data" / "comfyui_nodes.json").read_text())["nodes"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-slider tiny-sd set (pixel encoder), briefly trained once."""
    _, sset = train_tiny_set(tmp_path_factory, count=3, samples=4, steps=4, lr=2e-2, start=0.3)
    return sset


@pytest.fixture
def sset(trained):
    shutil.copytree(trained.path, store.kind_dir("sliders") / trained.name)
    return trained


def _export(folder, *extra):
    r = runner.invoke(app, ["sliders", "export", "a-shape", str(folder), "--json", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


# ---------------------------------------------------------------- ComfyUI


def _check_literal(where: str, spec: dict, value) -> None:
    kind = spec["type"]
    if kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    elif kind == "COMBO":
        if "choices" in spec:
            assert value in spec["choices"], where
        else:  # a file name from a models folder
            assert isinstance(value, str) and value.endswith((".safetensors", ".ckpt")), where
    else:
        raise AssertionError(f"{where}: a {kind} input must be a link, got {value!r}")
    if "min" in spec:
        assert spec["min"] <= value <= spec["max"], where


def check_workflow(graph: dict) -> None:
    """Every node, input name, literal and link of an API-format graph against ComfyUI's definitions."""
    for key, node in graph.items():
        assert set(node) <= {"class_type", "inputs", "_meta"}, key
        spec = NODES[node["class_type"]]  # KeyError: a node ComfyUI does not have
        allowed = {**spec["required"], **spec["optional"]}
        assert set(spec["required"]) <= set(node["inputs"]), (key, node["class_type"])
        for name, value in node["inputs"].items():
            assert name in allowed, f"{node['class_type']} has no input {name!r}"
            where = f"{key}.{node['class_type']}.{name}"
            if isinstance(value, list):  # a link [node id, output index]
                src, index = value
                assert src in graph and src != key, where
                outputs = NODES[graph[src]["class_type"]]["outputs"]
                assert 0 <= index < len(outputs) and outputs[index] == allowed[name]["type"], where
            else:
                _check_literal(where, allowed[name], value)
    # acyclic, and everything feeds the one output node
    order, seen = [], set()

    def visit(k, stack=()):
        assert k not in stack, f"cycle through {k}"
        if k in seen:
            return
        for v in graph[k]["inputs"].values():
            if isinstance(v, list):
                visit(v[0], (*stack, k))
        seen.add(k)
        order.append(k)

    outs = [k for k, n in graph.items() if NODES[n["class_type"]].get("output_node")]
    assert len(outs) == 1
    visit(outs[0])
    assert seen == set(graph), "nodes that feed nothing"


def test_comfyui_workflow_uses_only_published_nodes_and_the_exported_files(sset, tmp_path):
    doc = _export(tmp_path / "out", "--workflow", "comfyui", "--slider", "0=1.5", "--slider", "2=-1",
                  "--checkpoint", "tiny-sd.safetensors", "--seed", "7")
    graph = json.loads(Path(doc["workflows"][0]).read_text())
    check_workflow(graph)
    by_type = {}
    for node in graph.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    hooks = by_type["CreateHookLoraModelOnly"]
    assert [h["strength_model"] for h in hooks] == [1.5, -1.0]
    exported = {Path(p).name for p in doc["files"]}
    assert all(h["lora_name"] in exported for h in hooks)  # the kohya files written next to it
    kf = sorted(by_type["CreateHookKeyframe"], key=lambda k: k["start_percent"])
    assert [k["strength_mult"] for k in kf] == [0.0, 1.0]
    steps = sset.manifest["steps"]
    assert kf[1]["start_percent"] == doc["comfyui_start_percent"] == comfy_start_percent(steps, 0.3) > 0
    (ks,) = by_type["KSampler"]
    assert (ks["steps"], ks["seed"], ks["cfg"]) == (steps, 7, sset.manifest["guidance"])
    assert by_type["EmptyLatentImage"][0]["width"] == sset.manifest["width"]


@pytest.mark.parametrize("n", [2, 4, 10, 20, 25, 30, 50])
@pytest.mark.parametrize("start", [0.05, 0.1, 0.3, 0.5, 0.9])
def test_comfy_keyframe_opens_at_our_first_step(n, start):
    """ComfyUI's ddim_uniform steps (comfy/samplers.py: sigmas[1], sigmas[1 + ss], ... reversed, ss = 1000 // n) switch
    the keyframe on where sigma(t) <= percent_to_sigma(p) = sigma((1 - p) * 999), i.e. t <= (1 - p) * 999."""
    from diffusers import DDIMScheduler

    ours = DDIMScheduler(num_train_timesteps=1000, steps_offset=1)
    ours.set_timesteps(n)
    s = first_step(n, start)
    p = comfy_start_percent(n, start)
    comfy = list(range(1, 1000, max(1000 // n, 1)))[::-1]
    if s == 0:
        assert p == 0.0
        return
    active = [t <= (1 - p) * 999 for t in comfy]
    first = active.index(True)
    assert not any(active[:first]) and all(active[first:])
    assert comfy[first] == int(ours.timesteps[s])  # the same timestep our sliders start at
    assert 0 < p < 1


# ---------------------------------------------------------------- A1111 / loractl


def loractl_weights(tag: str, n: int) -> list[float]:
    """The UNet weight at each step, read the way sd-webui-loractl documents it: `<lora:NAME:...:unet=W@S,...>`,
    S > 1 in the last keyframe means absolute steps, weights interpolated (np.interp) at the 0-based step index."""
    m = re.fullmatch(r"<lora:([^:>]+)((?::[^:>]+)*)>", tag)
    args = [a for a in m[2].split(":") if a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    raw = named.get("unet", args[1] if len(args) > 1 and "=" not in args[1] else named.get("te", args[0] if args else "1"))
    pairs = [tuple(float(x) for x in kv.split("@")) for kv in re.split("[,;]", raw)]
    if len(pairs[0]) == 1:
        return [pairs[0][0]] * n
    pairs.sort(key=lambda p: p[1])
    w, at = [p[0] for p in pairs], [p[1] for p in pairs]
    assert at[-1] > 1, "fractions would be read relative to the step count"
    return [float(np.interp(i, at, w)) for i in range(n)]


@pytest.mark.parametrize("n, start", [(4, 0.3), (10, 0.1), (20, 0.1), (2, 0.5), (30, 0.25), (8, 0.0)])
def test_loractl_tag_is_zero_before_our_first_step_and_full_from_it(n, start):
    s = first_step(n, start)
    weights = loractl_weights(loractl_tag("a-shape-00-x", 1.5, n, start), n)
    assert weights == [0.0] * s + [1.5] * (n - s)


def test_a1111_export_and_generate_png_infotext_round_trip(sset, tmp_path):
    doc = _export(tmp_path / "out", "--workflow", "a1111", "--slider", "0=1.5", "--negative", "blurry, dark")
    label = sset.sliders[0].label
    name = f"a-shape-00-{store.slugify(label)}"
    assert f"{name}.safetensors" in {Path(p).name for p in doc["files"]}
    info = parse_infotext(doc["a1111"]["infotext"])
    assert info.prompt == doc["a1111"]["loractl"] and info.negative == "blurry, dark"
    assert info.params["Steps"] == str(sset.manifest["steps"]) and info.params["Sampler"] == "DDIM"
    assert doc["a1111"]["plain"] == f"a shape <lora:{name}:1.5>"
    text = Path(doc["workflows"][0]).read_text()
    assert doc["a1111"]["loractl"] in text and doc["a1111"]["plain"] in text
    # generate's PNG names the same file in a plain tag, in A1111's layout
    r = runner.invoke(app, ["generate", "a shape", "-m", "tiny-sd", "--slider", "0=1.5", "--count", "1", "--seed", "4",
                            "--out", str(tmp_path / "img"), "--json"])
    assert r.exit_code == 0, r.output
    png = Image.open(json.loads(r.stdout)["files"][0]["path"])
    info = parse_infotext(png.text["parameters"])
    assert info.prompt == f"a shape <lora:{name}:1.5>" and info.loras == [(name, 1.5)]
    assert info.params["Seed"] == "4" and info.params["Size"] == f"{png.width}x{png.height}"
    assert info.params["Steps"] == "4" and info.params["CFG scale"] == "7.5" and info.params["Model"] == "tiny-sd"
    assert info.params["Slider start"] == "0.3"
    assert format_infotext(info) == png.text["parameters"]  # parse -> format is the identity


def test_infotext_quotes_what_needs_quoting():
    info = Infotext("a dog,\nin the rain <lora:x:0.5>", "ugly, blurry\nlow quality",
                    {"Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "[1, 2]", "Note": 'say "hi": now'})
    text = format_infotext(info)
    assert 'Seed: "[1, 2]"' in text and 'Note: "say \\"hi\\": now"' in text
    assert parse_infotext(text) == info
    assert parse_infotext("just a prompt") == Infotext("just a prompt")


@pytest.mark.parametrize("args, fragment", [
    (["--workflow", "invokeai"], "--workflow"),
    (["--workflow", "comfyui", "--slider", "0=1"], "--checkpoint"),
    (["--workflow", "comfyui", "--checkpoint", "/abs/model.safetensors"], "--checkpoint"),
    (["--workflow", "a1111", "--slider", "0=25"], "[-20, 20]"),
    (["--workflow", "a1111", "--slider", "7=1"], "out of range"),
    (["--workflow", "a1111", "--slider", "other/0=1"], "set 'a-shape' only"),
    (["--workflow", "a1111", "--steps", "0"], "--steps"),
])
def test_bad_export_input_is_one_line_exit_2(sset, tmp_path, args, fragment):
    r = runner.invoke(app, ["sliders", "export", "a-shape", str(tmp_path / "out"), *args])
    assert fragment in one_line_error(r)
    assert not (tmp_path / "out").exists()


def test_a_set_without_a_window_gets_no_keyframes(sset):
    from dataclasses import replace

    from conceptkit.sliders.clients import ClientSettings, comfyui_workflow

    flat = replace(sset, manifest={**sset.manifest, "start": 0.0})
    graph = comfyui_workflow(flat, ClientSettings(((1, 2.0),), checkpoint="models/tiny.safetensors"))
    check_workflow(graph)
    types = [n["class_type"] for n in graph.values()]
    assert "CreateHookKeyframe" not in types and "SetHookKeyframes" not in types
    assert types.count("CreateHookLoraModelOnly") == 1


def test_model_hash_is_a1111s_short_sha256_of_a_single_file(tmp_path):
    import hashlib
    from types import SimpleNamespace

    from conceptkit.infotext import model_hash

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights" * 1000)
    assert model_hash(SimpleNamespace(source="single-file", spec=str(path))) == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert model_hash(SimpleNamespace(source="builtin", spec="tiny-sd")) is None


def test_generate_lora_next_to_a_slider(sset, tmp_path):
    from conceptkit.models.load import load_model
    from test_lora_import import kohya_file

    lora = kohya_file(load_model("tiny-sd", device="cpu").pipe.unet, tmp_path / "theirs.safetensors")

    def draw(*extra):
        r = runner.invoke(app, ["generate", "a shape", "-m", "tiny-sd", "--slider", "0=1.5", "--count", "1", "--seed", "4",
                                "--out", str(tmp_path / f"out-{len(list(tmp_path.iterdir()))}"), "--json", *extra])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["files"][0]["path"]

    slider_only = np.asarray(Image.open(draw()))
    assert np.array_equal(np.asarray(Image.open(draw("--lora", f"{lora}:0"))), slider_only)
    both = draw("--lora", f"{lora}:0.5")
    assert np.abs(np.asarray(Image.open(both)).astype(int) - slider_only).max() > 20
    name = f"a-shape-00-{store.slugify(sset.sliders[0].label)}"
    assert parse_infotext(Image.open(both).text["parameters"]).loras == [(name, 1.5), ("theirs", 0.5)]


def test_generate_lora_with_a_sweep_and_random_sliders(sset, tmp_path):
    from conceptkit.models.load import load_model
    from test_lora_import import kohya_file

    lora = kohya_file(load_model("tiny-sd", device="cpu").pipe.unet, tmp_path / "theirs.safetensors")

    def grid(*extra):
        r = runner.invoke(app, ["generate", "a shape", "-m", "tiny-sd", "--count", "2", "--out",
                                str(tmp_path / f"out-{len(list(tmp_path.iterdir()))}"), "--json", *extra])
        assert r.exit_code == 0, r.output
        return [np.asarray(Image.open(f["path"])) for f in json.loads(r.stdout)["files"]]

    sweep = ["--sweep", "0=-1:1:2"]
    assert np.array_equal(grid(*sweep, "--lora", f"{lora}:0")[0], grid(*sweep)[0])
    assert not np.array_equal(grid(*sweep, "--lora", f"{lora}:1")[0], grid(*sweep)[0])
    rand = ["--random-sliders", "2"]
    with_lora, without = grid(*rand, "--lora", f"{lora}:1"), grid(*rand)
    assert len(with_lora) == 2 and all(not np.array_equal(a, b) for a, b in zip(with_lora, without))
