"""Model loading: built-ins, folders, the hub cache, single files, errors, fingerprints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conceptkit.errors import ModelNotFoundError, UnsupportedModelError, UsageError
from conceptkit.models.load import (
    LoadedModel, builtin_models, build_tiny, fingerprint_pipeline, load_model, resolve_device, resolve_dtype,
)
from conceptkit.models.single_file import inspect_single_file

sys.path.insert(0, str(Path(__file__).parent))
from _ldm import save_ldm_checkpoint  # noqa: E402

TINY = ("tiny-sd", "tiny-sdxl")
PROMPT = "a photo of a red dog"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared, loaded CPU OpenMP threads that wait
    for each other turn a 0.2 s sample into 10 s or more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _empty_hf_cache(tmp_path, monkeypatch):
    """Point the Hugging Face cache at an empty folder: a real cache on this machine must not leak in."""
    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """tiny-sd and tiny-sdxl saved as diffusers folders, with an LDM single file of each beside them."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for name in TINY:
        pipe = build_tiny(name)
        pipe.save_pretrained(root / name, safe_serialization=True)
        save_ldm_checkpoint(pipe, root / f"{name}.safetensors")
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[str, np.ndarray]]:
    """(fingerprint, 2-step image for seed 0) of each tiny built-in, loaded as a built-in."""
    return {name: (m.fingerprint, _image(m)) for name in TINY for m in [load_model(name, device="cpu")]}


def _image(model: LoadedModel, seed: int = 0) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    return model.pipe(prompt=PROMPT, num_inference_steps=2, generator=generator, output_type="np").images


def _cache_repo(cache: Path, repo_id: str, folder: Path, revision: str = "0123abcd") -> Path:
    """Lay `folder` out in a Hugging Face cache as `repo_id` at `main`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision


def reference_arch(name: str) -> str:
    return {"tiny-sd": "sd1", "tiny-sdxl": "sdxl"}[name]


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


# ---- built-ins ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_tiny_builtin_loads_samples_and_describes_itself(name, reference):
    t0 = time.perf_counter()
    model = load_model(name, device="cpu")
    build_s = time.perf_counter() - t0
    expected_cls, arch = {"tiny-sd": ("StableDiffusionPipeline", "sd1"), "tiny-sdxl": ("StableDiffusionXLPipeline", "sdxl")}[name]
    assert type(model.pipe).__name__ == expected_cls
    assert (model.arch, model.source, model.spec) == (arch, "builtin", name)
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.pipe.unet.dtype == torch.float32
    assert type(model.pipe.scheduler).__name__ == "DDIMScheduler" and model.pipe.scheduler.config.steps_offset == 1
    assert 1 <= model.default_steps <= 10 and model.default_guidance > 1
    identity = model.identity()
    assert json.loads(json.dumps(identity)) == identity
    assert identity == {"spec": name, "arch": arch, "source": "builtin", "fingerprint": model.fingerprint, "dtype": "float32"}
    t0 = time.perf_counter()
    image = _image(model)
    sample_s = time.perf_counter() - t0
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    np.testing.assert_array_equal(image, reference[name][1])  # same seed, same image
    assert build_s < 20 and sample_s < 5, (build_s, sample_s)  # loose: CPUs here are shared


def test_tiny_tokenizer_has_one_token_per_listed_word():
    tokenizer = build_tiny("tiny-sd").tokenizer
    assert len(tokenizer("photo dog red", add_special_tokens=False).input_ids) == 3
    assert tokenizer.unk_token_id not in tokenizer("zebra", add_special_tokens=False).input_ids


def test_fingerprint_is_stable_distinct_and_sensitive(reference):
    a, b = build_tiny("tiny-sd"), build_tiny("tiny-sd")
    assert fingerprint_pipeline(a) == fingerprint_pipeline(b) == reference["tiny-sd"][0]
    assert reference["tiny-sd"][0] != reference["tiny-sdxl"][0]
    with torch.no_grad():
        b.unet.conv_in.weight[0, 0, 0, 0] += 1e-3  # one element (the first is always sampled)
    assert fingerprint_pipeline(b) != fingerprint_pipeline(a)
    c = build_tiny("tiny-sd")
    with torch.no_grad():
        c.text_encoder.final_layer_norm.bias.add_(1e-4)  # a fine-tune-like nudge of one tensor
    assert fingerprint_pipeline(c) != fingerprint_pipeline(a)
    d = build_tiny("tiny-sd")
    d.register_modules(scheduler=type(d.scheduler).from_config(d.scheduler.config, prediction_type="v_prediction"))
    assert fingerprint_pipeline(d) != fingerprint_pipeline(a)


def test_fingerprint_is_the_same_in_a_fresh_process(reference):
    code = "from conceptkit.models.load import build_tiny, fingerprint_pipeline; print(fingerprint_pipeline(build_tiny('tiny-sd')))"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == reference["tiny-sd"][0]


def test_fingerprint_ignores_device_dtype_but_identity_does_not(reference):
    half = load_model("tiny-sd", device="cpu", dtype="float16")
    assert half.pipe.unet.dtype == torch.float16 and half.dtype == torch.float16
    assert half.fingerprint == reference["tiny-sd"][0]  # fingerprinted in fp32, before the cast
    assert half.identity()["dtype"] == "float16"


def test_builtin_models_lists_every_builtin():
    models = {m.name: m for m in builtin_models()}
    assert set(models) == {"toy", "toy-turbo", "tiny-sd", "tiny-sdxl", "random-sd15", "random-sdxl", "tiny-flux", "tiny-sd3", "random-flux"}
    assert models["tiny-sdxl"].arch == "sdxl" and models["toy"].arch == "sd1"
    assert models["random-sdxl"].arch == "sdxl" and models["random-sd15"].arch == "sd1"
    assert all(m.description for m in models.values())


def test_toy_missing_weights_say_how_to_train(monkeypatch, tmp_path):
    monkeypatch.setattr("conceptkit.models.sources.toy_weights_dir", lambda: tmp_path / "no-weights")
    with pytest.raises(ModelNotFoundError) as err:
        load_model("toy", device="cpu")
    assert "python -m conceptkit.toy.train" in _one_line(err)


def test_toy_loads_a_pipeline_folder_with_its_sampling_defaults(monkeypatch, saved, reference):
    monkeypatch.setattr("conceptkit.models.sources.toy_weights_dir", lambda: saved["tiny-sd"])
    monkeypatch.setattr("conceptkit.models.load.toy_defaults", lambda: {"steps": 12, "guidance": 3.0})
    model = load_model("toy", device="cpu")
    assert (model.source, model.arch, model.fingerprint) == ("builtin", "sd1", reference["tiny-sd"][0])
    assert (model.default_steps, model.default_guidance) == (12, 3.0)


# ---- folders, hub cache, single files -------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_folder_loads_same_weights_same_image(name, saved, reference):
    model = load_model(str(saved[name]), device="cpu")
    assert model.source == "folder" and model.arch == reference_arch(name)
    assert model.fingerprint == reference[name][0]
    np.testing.assert_array_equal(_image(model), reference[name][1])


@pytest.mark.parametrize("name", TINY)
def test_single_file_with_config_reproduces_the_image(name, saved, reference):
    path = saved[name].with_suffix(".safetensors")
    assert inspect_single_file(path).arch == reference_arch(name)
    model = load_model(str(path), device="cpu", config=str(saved[name]))
    assert model.source == "single-file" and model.arch == reference_arch(name)
    assert model.fingerprint == reference[name][0]
    np.testing.assert_allclose(_image(model), reference[name][1], atol=1e-5)


def test_sd2_layout_single_file_loads_as_sd2(saved, reference, tmp_path):
    path = save_ldm_checkpoint(build_tiny("tiny-sd"), tmp_path / "tiny-sd2.safetensors", open_clip=True)
    assert inspect_single_file(path).arch == "sd2"
    model = load_model(str(path), device="cpu", config=str(saved["tiny-sd"]))
    assert (model.source, model.arch, model.fingerprint) == ("single-file", "sd2", reference["tiny-sd"][0])
    np.testing.assert_allclose(_image(model), reference["tiny-sd"][1], atol=1e-5)


def test_single_file_takes_canonical_config_from_the_cache(saved, reference, _empty_hf_cache):
    _cache_repo(_empty_hf_cache, "stable-diffusion-v1-5/stable-diffusion-v1-5", saved["tiny-sd"])
    model = load_model(str(saved["tiny-sd"].with_suffix(".safetensors")), device="cpu")
    assert model.source == "single-file" and model.fingerprint == reference["tiny-sd"][0]


def test_configs_only_download_serves_as_config_but_not_as_model(saved, reference, _empty_hf_cache, tmp_path):
    configs = tmp_path / "configs-only"
    shutil.copytree(saved["tiny-sd"], configs, ignore=shutil.ignore_patterns("*.safetensors"))
    _cache_repo(_empty_hf_cache, "someone/tiny-sd-configs", configs)
    with pytest.raises(ModelNotFoundError) as err:
        load_model("someone/tiny-sd-configs", device="cpu")
    assert "no weights" in _one_line(err)
    model = load_model(str(saved["tiny-sd"].with_suffix(".safetensors")), device="cpu", config="someone/tiny-sd-configs")
    assert model.source == "single-file" and model.fingerprint == reference["tiny-sd"][0]


def test_single_file_without_config_says_pass_config(saved):
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as err:
        load_model(str(saved["tiny-sdxl"].with_suffix(".safetensors")), device="cpu")
    message = _one_line(err)
    assert "--config" in message and "stabilityai/stable-diffusion-xl-base-1.0" in message
    assert time.perf_counter() - t0 < 10


def test_single_file_with_config_of_another_arch_is_refused(saved):
    with pytest.raises(UsageError) as err:
        load_model(str(saved["tiny-sdxl"].with_suffix(".safetensors")), device="cpu", config=str(saved["tiny-sd"]))
    assert "--config" in _one_line(err)


def test_hub_id_loads_from_the_local_cache(saved, reference, _empty_hf_cache):
    _cache_repo(_empty_hf_cache, "someone/tiny-sdxl", saved["tiny-sdxl"])
    model = load_model("someone/tiny-sdxl", device="cpu")
    assert (model.source, model.arch, model.spec) == ("hub-cache", "sdxl", "someone/tiny-sdxl")
    assert model.fingerprint == reference["tiny-sdxl"][0]


def test_missing_hub_id_fails_fast_saying_how_to_get_it():
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as err:
        load_model("nobody/no-such-model", device="cpu")
    assert time.perf_counter() - t0 < 10
    message = _one_line(err)
    assert "`hf download nobody/no-such-model`" in message and "local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE=1" in message  # says why nothing was downloaded


def test_distilled_models_get_few_step_defaults(saved, tmp_path):
    turbo = tmp_path / "my-sdxl-turbo"
    shutil.copytree(saved["tiny-sdxl"], turbo)
    model = load_model(str(turbo), device="cpu")
    assert (model.default_steps, model.default_guidance) == (1, 0.0)

    from diffusers import LCMScheduler

    pipe = build_tiny("tiny-sd")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "distilled")
    model = load_model(str(tmp_path / "distilled"), device="cpu")
    assert type(model.pipe.scheduler).__name__ == "LCMScheduler"
    assert model.default_steps == 4 and model.default_guidance <= 1.5

    plain = load_model(str(saved["tiny-sd"]), device="cpu")
    assert plain.default_steps >= 20 and plain.default_guidance == 7.5


# ---- errors ---------------------------------------------------------------------------------

def _folder_with_index(tmp_path: Path, index: dict, name: str = "m") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize(
    ("make_spec", "error", "words"),
    [
        (lambda tmp: "tiny-sd4", ModelNotFoundError, "not a built-in"),
        (lambda tmp: str(tmp / "does-not-exist"), ModelNotFoundError, "no such file"),
        (lambda tmp: str(tmp / "nope.safetensors"), ModelNotFoundError, "no such file"),
        (lambda tmp: str((tmp / "notes").mkdir() or tmp / "notes"), UnsupportedModelError, "model_index.json"),
        (lambda tmp: str(_folder_with_index(tmp, {"_class_name": "StableCascadeCombinedPipeline"})), UnsupportedModelError,
         "StableCascadeCombinedPipeline"),
        (lambda tmp: str(_folder_with_index(tmp, {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]})),
         ModelNotFoundError, "no weights in transformer/"),
        (lambda tmp: str(_folder_with_index(tmp, {"_class_name": "StableDiffusionXLImg2ImgPipeline",
                                                  "text_encoder": [None, None]})), UnsupportedModelError, "refiner"),
    ],
    ids=["unknown-name", "no-folder", "no-file", "not-a-pipeline", "other-pipeline", "flux-without-weights", "sdxl-refiner"],
)
def test_bad_models_fail_with_one_line(tmp_path, make_spec, error, words):
    with pytest.raises(error) as err:
        load_model(make_spec(tmp_path), device="cpu")
    assert words in _one_line(err)


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_pickled_single_files_are_refused_unread(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04this would be a pickle")
    with pytest.raises(UsageError) as err:
        load_model(str(path), device="cpu")
    assert err.type is UsageError and "safetensors" in _one_line(err)


def test_pickled_only_folder_is_refused(tmp_path):
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    folder = _folder_with_index(tmp_path, index)
    (folder / "unet").mkdir()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UsageError) as err:
        load_model(str(folder), device="cpu")
    assert "pickled" in _one_line(err)


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        ({"double_blocks.0.img_attn.norm.key_norm.scale": [4]}, "FLUX"),
        ({"conditioner.embedders.0.model.text_projection": [4, 4], "model.diffusion_model.input_blocks.0.0.weight": [4, 4, 3, 3]},
         "refiner"),
        ({"lora_unet_down_blocks_0.lora_down.weight": [4, 4]}, "LoRA"),
        ({"model.diffusion_model.input_blocks.0.0.weight": [4, 9, 3, 3], "cond_stage_model.transformer.x": [4]}, "inpainting"),
    ],
    ids=["flux", "sdxl-refiner", "lora", "inpainting"],
)
def test_foreign_single_files_are_unsupported(tmp_path, keys, words):
    path = tmp_path / "thing.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    with pytest.raises(UnsupportedModelError) as err:
        load_model(str(path), device="cpu")
    assert words in _one_line(err)


def test_single_file_arch_detection_from_keys(tmp_path):
    path = tmp_path / "sd2.safetensors"
    keys = {
        "model.diffusion_model.input_blocks.0.0.weight": [8, 4, 3, 3],
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [8, 1024],
        "cond_stage_model.model.token_embedding.weight": [10, 1024],
    }
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    info = inspect_single_file(path)
    assert (info.arch, info.context_dim) == ("sd2", 1024)


def test_degenerate_tokenizer_is_refused(saved, tmp_path):
    from transformers import CLIPTokenizer

    folder = tmp_path / "broken-tokenizer"
    shutil.copytree(saved["tiny-sd"], folder)
    shutil.rmtree(folder / "tokenizer")
    CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[]).save_pretrained(folder / "tokenizer")
    with pytest.raises(UnsupportedModelError) as err:
        load_model(str(folder), device="cpu")
    assert "tokenizer" in _one_line(err)


def test_config_is_for_single_files_only(saved):
    with pytest.raises(UsageError) as err:
        load_model("tiny-sd", config=str(saved["tiny-sd"]))
    assert "--config" in _one_line(err)


# ---- device and dtype -----------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error():
    with pytest.raises(UsageError) as err:
        load_model("tiny-sd", device="cuda")
    assert "--device cpu" in _one_line(err)


def test_device_and_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == cpu
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16 and resolve_dtype("float16", cpu) == torch.float16
    for bad_device in ("tpu", "cuda:x"):
        with pytest.raises(UsageError):
            resolve_device(bad_device)
    with pytest.raises(UsageError) as err:
        resolve_dtype("float8", cpu)
    assert "float32" in _one_line(err)

