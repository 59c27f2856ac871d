"""Memory: half runs load half-stored weights straight in their dtype with the fingerprint unchanged;
--offload none|model|sequential maps to diffusers' CPU offload on CUDA and is refused elsewhere in one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conceptkit.cli import app
from conceptkit.models import memory
from conceptkit.models.flow import build_flow_tiny
from conceptkit.models.load import load_model

sys.path.insert(0, str(Path(__file__).parent))
from _cli import one_line_error  # noqa: E402

runner = CliRunner()


def _spy_dtypes(monkeypatch, cls, method: str) -> list:
    """The `torch_dtype` of every call to the classmethod `cls.method`, which still runs."""
    seen = []
    real = getattr(cls, method).__func__

    def spy(klass, *args, **kwargs):
        seen.append(kwargs["torch_dtype"])
        return real(klass, *args, **kwargs)

    monkeypatch.setattr(cls, method, classmethod(spy))
    return seen


@pytest.fixture(scope="module")
def flux_folders(tmp_path_factory):
    """tiny-flux saved twice: as built (float32) and cast to bfloat16 (as FLUX.1-dev is published)."""
    root = tmp_path_factory.mktemp("flux")
    pipe = build_flow_tiny("tiny-flux")
    pipe.save_pretrained(root / "fp32", safe_serialization=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            torch.nn.Module.to(component, dtype=torch.bfloat16)
    pipe.save_pretrained(root / "bf16", safe_serialization=True)
    return root / "fp32", root / "bf16"


def _dtypes(pipe) -> set[torch.dtype]:
    return {p.dtype for c in pipe.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters()}


def test_a_half_run_loads_half_stored_weights_in_their_dtype(flux_folders, monkeypatch):
    _, bf16 = flux_folders
    assert memory.folder_dtypes(bf16, None, torch.float32) == torch.float32  # a float32 run: as before
    dtypes = memory.folder_dtypes(bf16, None, torch.bfloat16)
    assert {dtypes[n] for n in ("transformer", "vae", "text_encoder", "text_encoder_2")} == {torch.bfloat16}
    import diffusers

    seen = _spy_dtypes(monkeypatch, diffusers.FluxPipeline, "from_pretrained")
    half = load_model(str(bf16), device="cpu", dtype="bfloat16")
    assert seen[0]["transformer"] == torch.bfloat16 and _dtypes(half.pipe) == {torch.bfloat16}
    full = load_model(str(bf16), device="cpu", dtype="float32")
    assert seen[1] == torch.float32 and _dtypes(full.pipe) == {torch.float32}
    assert half.fingerprint == full.fingerprint  # the upcast of bf16 is exact: one fingerprint


def test_float32_stored_weights_keep_their_fingerprint_in_a_half_run(flux_folders):
    fp32, _ = flux_folders
    assert memory.folder_dtypes(fp32, None, torch.bfloat16)["transformer"] == torch.float32  # loaded fp32, then cast
    half = load_model(str(fp32), device="cpu", dtype="bfloat16")
    assert _dtypes(half.pipe) == {torch.bfloat16}
    assert half.fingerprint == load_model("tiny-flux", device="cpu").fingerprint


def test_a_bf16_flux_single_file_loads_in_bf16_with_its_fingerprint(flux_folders, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from _clients import flux_bfl_state_dict
    from conceptkit.models import single_file

    seen = []
    real = single_file.load_flow_transformer

    def spy(*args):
        transformer = real(*args)
        seen.append({p.dtype for p in transformer.parameters()})
        return transformer

    monkeypatch.setattr(single_file, "load_flow_transformer", spy)

    fp32, bf16 = flux_folders
    state = flux_bfl_state_dict(load_model(str(fp32), device="cpu").pipe.transformer)
    path = tmp_path / "flux1-tiny.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(path))
    half = load_model(str(path), device="cpu", dtype="bfloat16", config=str(bf16))
    assert seen == [{torch.bfloat16}] and _dtypes(half.pipe) == {torch.bfloat16}  # never float32 on the way
    assert half.fingerprint == load_model(str(path), device="cpu", dtype="float32", config=str(bf16)).fingerprint


def test_a_mixed_file_loads_in_float32(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "mixed.safetensors"
    save_file({"a": torch.zeros(2, dtype=torch.float16), "b": torch.zeros(2, dtype=torch.bfloat16),
               "n": torch.zeros(2, dtype=torch.int64)}, str(path))
    assert memory.stored_dtype([path]) == torch.float32
    save_file({"a": torch.zeros(2, dtype=torch.float16), "n": torch.zeros(2, dtype=torch.int64)}, str(path))
    assert memory.file_dtype(path, torch.bfloat16) == torch.float16  # loaded as stored, cast to bf16 afterwards
    assert memory.file_dtype(path, torch.float32) == torch.float32


# ---------------------------------------------------------------- --offload


@pytest.mark.parametrize("command", [
    ["harvest", "a shape", "--samples", "1"], ["generate", "a shape", "--count", "1"],
    ["cluster", "a shape", "--samples", "2", "--importance", "activation"],
])
@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_on_a_cpu_is_one_line_before_any_work(command, mode, tmp_path, monkeypatch):
    import conceptkit.models.load as load

    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    r = runner.invoke(app, [*command, "-m", "tiny-sd", "--device", "cpu", "--offload", mode, "--out", str(tmp_path / "o")]
                      if command[0] == "generate" else [*command, "-m", "tiny-sd", "--device", "cpu", "--offload", mode])
    assert "--offload needs a CUDA device" in one_line_error(r)


def test_an_unknown_offload_and_offloaded_slider_training_are_one_line(tmp_path):
    r = runner.invoke(app, ["harvest", "a shape", "-m", "tiny-sd", "--device", "cpu", "--offload", "disk"])
    assert "unknown --offload 'disk'; choose none, model or sequential" in one_line_error(r)
    r = runner.invoke(app, ["sliders", "train", "a shape", "-m", "tiny-sd", "--offload", "model"])
    assert "does not work with `sliders train`" in one_line_error(r)
    r = runner.invoke(app, ["generate", "a shape", "-m", "tiny-sd", "--slider", "0=1", "--offload", "sequential",
                            "--out", str(tmp_path / "o")])
    assert "does not work with sliders" in one_line_error(r)
    r = runner.invoke(app, ["cluster", "a shape", "-m", "tiny-sd", "--offload", "model"])
    assert "does not work with --importance grad" in one_line_error(r)
    r = runner.invoke(app, ["generate", "a <w>", "-m", "tiny-sd", "--embedding", str(tmp_path / "w.safetensors"),
                            "--token", "<w>", "--offload", "sequential", "--out", str(tmp_path / "o")])
    assert "does not work with --embedding" in one_line_error(r)


def test_offload_none_changes_nothing(tmp_path):
    args = ["generate", "a shape", "-m", "tiny-sd", "--device", "cpu", "--count", "2", "--steps", "2"]
    a = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    b = runner.invoke(app, [*args, "--offload", "none", "--out", str(tmp_path / "b")])
    assert a.exit_code == b.exit_code == 0, (a.output, b.output)
    pngs = sorted((tmp_path / "a").glob("*.png"))
    assert len(pngs) == 2
    assert [p.read_bytes() for p in pngs] == [(tmp_path / "b" / p.name).read_bytes() for p in pngs]


@pytest.mark.parametrize("mode,method", [("model", "enable_model_cpu_offload"),
                                         ("sequential", "enable_sequential_cpu_offload")])
def test_offload_calls_diffusers_on_a_cuda_device(mode, method, monkeypatch):
    import diffusers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    calls = []
    monkeypatch.setattr(diffusers.DiffusionPipeline, method, lambda self, device=None: calls.append((type(self).__name__, device)))
    loaded = load_model("tiny-sd", device="cuda", dtype="float32", offload=mode)
    assert calls == [("StableDiffusionPipeline", torch.device("cuda"))]
    assert loaded.device == torch.device("cuda")
    assert loaded.pipe.unet.device.type == "cpu"  # left on the CPU for diffusers' hooks to move
    assert loaded.fingerprint == load_model("tiny-sd", device="cpu").fingerprint


def test_an_fp16_sd_single_file_loads_in_fp16_with_its_fingerprint(tmp_path, monkeypatch):
    import diffusers

    from _ldm import save_ldm_checkpoint
    from conceptkit.models.load import build_tiny

    pipe = build_tiny("tiny-sd")
    pipe.save_pretrained(tmp_path / "config", safe_serialization=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            torch.nn.Module.to(component, dtype=torch.float16)
    path = save_ldm_checkpoint(pipe, tmp_path / "tiny-sd-fp16.safetensors")
    assert memory.file_dtype(path, torch.float16) == torch.float16
    seen = _spy_dtypes(monkeypatch, diffusers.StableDiffusionPipeline, "from_single_file")
    half = load_model(str(path), device="cpu", dtype="float16", config=str(tmp_path / "config"))
    full = load_model(str(path), device="cpu", dtype="float32", config=str(tmp_path / "config"))
    assert seen == [torch.float16, torch.float32] and _dtypes(half.pipe) == {torch.float16}
    assert half.fingerprint == full.fingerprint
