"""Downloads behave as users expect: cache first, then a named, sized download; offline, unreachable and gated fail in one line.

A fake hub on localhost (`_fake_hub.FakeHub`, pointed at with HF_ENDPOINT) serves the endpoints
huggingface_hub's `snapshot_download` / `hf_hub_download` call; tiny models saved with
`save_pretrained` stand in for real repositories.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conceptkit.models import hub
from conceptkit.cli import app
from conceptkit.errors import ModelNotFoundError, UnsupportedModelError, UsageError
from conceptkit.models.hub_files import select_encoder_files, select_pipeline_files, weight_variant

sys.path.insert(0, str(Path(__file__).parent))
from _cli import one_line_error  # noqa: E402
from _fake_hub import FakeHub  # noqa: E402
from _ldm import save_ldm_checkpoint  # noqa: E402

REPO = "test-org/tiny-sd"
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """tiny-sd as a diffusers folder and as an LDM single file; a tiny DINOv2 as a transformers folder."""
    from transformers import Dinov2Config, Dinov2Model

    from conceptkit.models.load import build_tiny

    root = tmp_path_factory.mktemp("repos")
    pipe = build_tiny("tiny-sd")
    pipe.save_pretrained(root / "tiny-sd", safe_serialization=True)
    save_ldm_checkpoint(pipe, root / "tiny-sd.safetensors")
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=16, patch_size=8)
    Dinov2Model(cfg).save_pretrained(root / "dino")
    return {"tiny-sd": root / "tiny-sd", "single": root / "tiny-sd.safetensors", "dino": root / "dino"}


@pytest.fixture
def fake_hub(saved, tmp_path, monkeypatch):
    """Online against a fake hub, with an empty Hugging Face cache."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once, when it was imported
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with FakeHub() as server:
        server.add(REPO, saved["tiny-sd"])
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server
    hub.set_offline(False)


def _generate(*options: str, model: str = REPO, out: Path):
    args = [*options, "generate", "a red dog", "--model", model, "--count", "1", "--steps", "1", "--device", "cpu",
            "--out", str(out), "--json"]
    return runner.invoke(app, args)


def test_importing_conceptkit_leaves_the_hub_settings_alone():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    code = "import os, conceptkit, conceptkit.cli; print(os.environ.get('HF_HUB_OFFLINE'), os.environ.get('TRANSFORMERS_OFFLINE'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None"]


def test_missing_model_is_named_sized_downloaded_with_a_bar_and_loads(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_POSITION", "-1")  # huggingface_hub's bars show on a terminal; force them into the capture
    r = _generate(out=tmp_path / "images")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # stdout holds the JSON document only
    assert doc["model"] == REPO and len(doc["files"]) == 1
    files = fake_hub.files(REPO)
    size = sum(files.values())
    line = [x for x in r.stderr.splitlines() if x.startswith("downloading model")]
    assert line == [f"downloading model {REPO}: {len(files)} files, {size / 1e6:.1f} MB, into {tmp_path / 'hf-hub'}"]
    assert "Fetching" in r.stderr or "Download" in r.stderr  # huggingface_hub's own progress bar
    snapshot = tmp_path / "hf-hub" / "models--test-org--tiny-sd" / "snapshots" / fake_hub.sha(REPO)
    assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()) == sorted(files)

    # the same weights as the built-in, and a second run finds them in the cache without asking the hub
    from conceptkit.models.load import load_model

    asked = len(fake_hub.requests)
    assert load_model(REPO, device="cpu").fingerprint == load_model("tiny-sd", device="cpu").fingerprint
    again = _generate(out=tmp_path / "again")
    assert again.exit_code == 0, again.output
    assert "downloading" not in again.stderr and len(fake_hub.requests) == asked
    assert _generate("--offline", out=tmp_path / "offline").exit_code == 0  # and offline, from the cache alone


@pytest.mark.parametrize("how", ["env", "flag"])
def test_offline_missing_model_fails_in_one_line_saying_what_to_run(fake_hub, tmp_path, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    r = _generate(*(["--offline"] if how == "flag" else []), out=tmp_path / "images")
    assert time.perf_counter() - t0 < 10
    line = one_line_error(r)
    assert f"`hf download {REPO}`" in line and "not cached" in line and "local folder or file" in line
    assert fake_hub.requests == []  # offline means no request at all


@pytest.mark.parametrize("status", [401, 403])
def test_gated_repository_says_log_in(fake_hub, saved, tmp_path, status):
    fake_hub.add("test-org/gated", saved["tiny-sd"], gated=status)
    line = one_line_error(_generate(model="test-org/gated", out=tmp_path / "images"))
    assert "`hf auth login`" in line and "gated" in line and f"HTTP {status}" in line


def test_unknown_repository_says_not_found(fake_hub, tmp_path):
    line = one_line_error(_generate(model="test-org/no-such-model", out=tmp_path / "images"))
    assert "not found on the Hugging Face Hub" in line and "`hf auth login`" in line


def test_unreachable_hub_fails_fast_saying_download_it_elsewhere(fake_hub, tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    t0 = time.perf_counter()
    line = one_line_error(_generate(out=tmp_path / "images"))
    assert time.perf_counter() - t0 < 10
    assert "could not reach the Hugging Face Hub" in line and f"`hf download {REPO}`" in line


def test_every_download_is_named_before_any_starts(fake_hub, saved):
    fake_hub.add("test-org/tiny-dino", saved["dino"])
    needs = [hub.Need(REPO, "pipeline"), hub.Need("test-org/tiny-dino", "encoder", role="encoder")]
    weights_asked = []

    def say(line):
        weights_asked.append(sum(1 for m, p in fake_hub.requests if m == "GET" and p.endswith(".safetensors")))

    found = hub.prepare(needs, say=say)
    assert weights_asked == [0, 0]  # both lines came before the first weight file was fetched
    assert set(found) == {REPO, "test-org/tiny-dino"}


def test_offline_sliders_name_model_and_encoder_in_one_line(fake_hub, tmp_path):
    r = runner.invoke(app, ["--offline", "sliders", "a red dog", "--model", REPO, "--encoder", "dinov2:test-org/tiny-dino",
                            "--device", "cpu"])
    line = one_line_error(r)
    assert f"`hf download {REPO}`" in line and "`hf download test-org/tiny-dino`" in line


def test_encoder_is_downloaded_then_loads_and_offline_fails_in_one_line(fake_hub, saved, monkeypatch):
    from conceptkit.features import Dinov2Encoder, load_encoder

    fake_hub.add("test-org/tiny-dino", saved["dino"])
    enc = load_encoder("dinov2:test-org/tiny-dino")
    assert isinstance(enc, Dinov2Encoder) and enc.dim == 16
    fake_hub.add("test-org/other-dino", saved["dino"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        load_encoder("dinov2:test-org/other-dino")
    assert "`hf download test-org/other-dino`" in str(err.value) and "--encoder dinov2:/path/to/folder" in str(err.value)
    assert load_encoder("dinov2:test-org/tiny-dino").dim == 16  # the downloaded one loads offline from the cache


def test_gated_encoder_says_log_in(fake_hub, saved):
    from conceptkit.features import load_encoder

    fake_hub.add("test-org/gated-dino", saved["dino"], gated=401)
    with pytest.raises(ModelNotFoundError) as err:
        load_encoder("dinov2:test-org/gated-dino")
    assert "`hf auth login`" in str(err.value) and "\n" not in str(err.value)


def test_single_file_downloads_only_the_configs_it_borrows(fake_hub, saved):
    from conceptkit.models.load import load_model

    canonical = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    fake_hub.add(canonical, saved["tiny-sd"])
    model = load_model(str(saved["single"]), device="cpu")
    assert model.source == "single-file" and model.fingerprint == load_model("tiny-sd", device="cpu").fingerprint
    fetched = [p for m, p in fake_hub.requests if m == "GET" and "/resolve/" in p]
    assert fetched and all(p.endswith((".json", ".txt")) for p in fetched)


# ---- which files a repository's listing yields (no network) ------------------------------------

SDXL_INDEX = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
              "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
              "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
              "tokenizer_2": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
              "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"]}


def _sdxl_listing() -> dict[str, int]:
    files = {"model_index.json": 1, "sd_xl_base_1.0.safetensors": 7_000, "README.md": 1, "scheduler/scheduler_config.json": 1,
             "safety_checker/config.json": 1, "safety_checker/model.safetensors": 1_200}
    for comp, size in (("unet", 10_000), ("vae", 300), ("text_encoder", 500), ("text_encoder_2", 2_800)):
        stem = "diffusion_pytorch_model" if comp in ("unet", "vae") else "model"
        files |= {f"{comp}/config.json": 1, f"{comp}/{stem}.safetensors": size, f"{comp}/{stem}.fp16.safetensors": size // 2,
                  f"{comp}/{stem}.bin": size, f"{comp}/{stem}.non_ema.safetensors": size}
    for tok in ("tokenizer", "tokenizer_2"):
        files |= {f"{tok}/vocab.json": 1, f"{tok}/merges.txt": 1, f"{tok}/tokenizer_config.json": 1}
    return files


@pytest.mark.parametrize("prefer_fp16, variant", [(True, ".fp16"), (False, "")])
def test_pipeline_selection_takes_one_variant_of_what_the_loader_reads(prefer_fp16, variant):
    chosen = select_pipeline_files("x/sdxl", SDXL_INDEX, _sdxl_listing(), prefer_fp16=prefer_fp16)
    weights = sorted(f for f in chosen if f.endswith(".safetensors"))
    assert weights == sorted([f"unet/diffusion_pytorch_model{variant}.safetensors", f"vae/diffusion_pytorch_model{variant}.safetensors",
                              f"text_encoder/model{variant}.safetensors", f"text_encoder_2/model{variant}.safetensors"])
    assert "tokenizer_2/merges.txt" in chosen and "scheduler/scheduler_config.json" in chosen
    assert not any(f.startswith("safety_checker") or f.endswith((".bin", ".md")) for f in chosen)
    configs = select_pipeline_files("x/sdxl", SDXL_INDEX, _sdxl_listing(), prefer_fp16=False, configs_only=True)
    assert configs and all(f.endswith((".json", ".txt")) for f in configs) and "unet/config.json" in configs


def test_pipeline_selection_refuses_pickles_and_foreign_pipelines():
    files = {k: v for k, v in _sdxl_listing().items() if not (k.startswith("unet/") and k.endswith(".safetensors"))}
    with pytest.raises(UsageError, match="pickled"):
        select_pipeline_files("x/sdxl", SDXL_INDEX, files, prefer_fp16=False)
    with pytest.raises(UnsupportedModelError, match="refiner"):
        select_pipeline_files("x/ref", {**SDXL_INDEX, "_class_name": "StableDiffusionXLImg2ImgPipeline"}, _sdxl_listing(),
                              prefer_fp16=False)
    with pytest.raises(UsageError, match="pickled"):
        select_encoder_files("x/clip", {"config.json": 1, "pytorch_model.bin": 9})
    assert select_encoder_files("x/clip", {"config.json": 1, "model.safetensors": 9, "tf_model.h5": 9, "merges.txt": 1}) == [
        "config.json", "merges.txt", "model.safetensors"]


@pytest.mark.parametrize("name, variant", [
    ("model.safetensors", None), ("diffusion_pytorch_model-00001-of-00002.safetensors", None),
    ("model.safetensors.index.json", None), ("model.fp16.safetensors", "fp16"),
    ("model.fp16-00001-of-00002.safetensors", "fp16"), ("model.safetensors.index.fp16.json", "fp16"),
    ("model.non_ema.safetensors", "non_ema"), ("config.json", ""), ("model.bin", ""),
])
def test_weight_variant_reads_diffusers_file_names(name, variant):
    assert weight_variant(name) == variant
