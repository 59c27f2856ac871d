"""Load a text-to-image pipeline: a built-in, a hub id, a local folder or a single file.

A hub id is looked up in the local Hugging Face cache first and downloaded into it when missing
(`hub`); offline, a model that is not on disk fails at once with a line saying how to get it.
diffusers itself only ever reads local folders. Weights are loaded on the CPU exactly as stored
(a half run loads half-stored weights in their dtype, `models/memory.py`), fingerprinted, then moved
and cast, so the fingerprint names the weights whatever device or precision a run uses. Handles SD 1.x / 2.x
(`StableDiffusionPipeline`) and SDXL (`StableDiffusionXLPipeline`), few-step distilled variants
included (Turbo, LCM, DMD, Lightning: through sampling defaults), and the flow-matching transformers
FLUX.1 (`FluxPipeline`) and SD3 / SD3.5 (`StableDiffusion3Pipeline`, `models/flow.py`); anything else is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from contextlib import contextmanager
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from conceptkit.errors import ModelNotFoundError, UnsupportedModelError, UsageError
from conceptkit.models import hub
from conceptkit.models.sources import (
    HUB_ID_RE, check_folder, hub_needs, is_single_file_spec, load_folder, looks_like_path, pipeline_need,
    resolve_single_file_config, toy_folder,
)
from conceptkit.models.flow import FLOW_BUILTINS, FLOW_PIPELINES, FLOW_TINY_NAMES, build_flow_tiny, flow_defaults
from conceptkit.models.full import FULL_NAMES, build_full
from conceptkit.models.memory import apply_offload, check_offload, move_and_cast
from conceptkit.models.single_file import check_config_matches, inspect_single_file, load_single_file
from conceptkit.models.tiny import TINY_NAMES, build_tiny
from conceptkit.toy.model import sampling_defaults as toy_defaults
from conceptkit.toy.turbo import turbo_folder

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = [
    "BuiltinModel", "LoadedModel", "build_tiny", "builtin_models", "fingerprint_pipeline", "hub_needs", "load_model",
    "resolve_device", "resolve_dtype",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAMPLE_PER_TENSOR = 4096  # elements of each tensor that enter the fingerprint (a strided sample)
PROBE_WORDS = ("a", "photo", "dog")  # a sane tokenizer maps none of these to its unknown token


@dataclass(frozen=True)
class LoadedModel:
    """A pipeline ready to sample, with what identifies it and how to sample it by default."""

    pipe: DiffusionPipeline  # StableDiffusion(XL)Pipeline | FluxPipeline | StableDiffusion3Pipeline, progress bar off
    spec: str  # what the user passed to --model
    arch: str  # "sd1" | "sd2" | "sdxl" | "flux" | "sd3"
    source: str  # "builtin" | "hub-cache" | "folder" | "single-file"
    fingerprint: str  # sha256 hex of the weights as stored (before any cast): see fingerprint_pipeline
    device: torch.device
    dtype: torch.dtype
    default_steps: int  # sampling steps that suit this model (1-4 for few-step distilled models)
    default_guidance: float  # classifier-free guidance scale that suits it (0.0 for Turbo)
    # learned words whose vector changes with the timestep (`implant --method temporal`): (token id, (D, d) vectors)
    tokens_in_time: tuple = ()
    # learned words with one vector per cross-attention layer (`implant --method xti`): (token id, (G, d) vectors)
    tokens_in_layers: tuple = ()

    def identity(self) -> dict:
        """What names this model in cache keys and manifests (JSON-able)."""
        return {
            "spec": self.spec, "arch": self.arch, "source": self.source, "fingerprint": self.fingerprint,
            "dtype": str(self.dtype).removeprefix("torch."),
        }


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships with (or is built by) conceptkit, for `conceptkit models`."""

    name: str
    arch: str
    description: str


BUILTINS = (
    BuiltinModel("toy", "sd1", "the trained toy world model (32x32 shapes and colours): fast end-to-end runs with known answers"),
    BuiltinModel("toy-turbo", "sd1", "the toy distilled to 1-4 steps (DMD2): mode-collapsed on what a prompt leaves open, like SDXL-DMD"),
    BuiltinModel("tiny-sd", "sd1", "tiny random SD 1.x-shaped pipeline built from config: tests and dry runs, draws noise"),
    BuiltinModel("tiny-sdxl", "sdxl", "tiny random SDXL-shaped pipeline (two text encoders): tests and dry runs, draws noise"),
    BuiltinModel("random-sd15", "sd1", "full-size SD 1.5 architecture with random weights (860M UNet): benchmarks, draws noise"),
    BuiltinModel("random-sdxl", "sdxl", "full-size SDXL base architecture with random weights (2.6B UNet): benchmarks, draws noise"),
    *(BuiltinModel(*b) for b in FLOW_BUILTINS),
)


def builtin_models() -> list[BuiltinModel]:
    """The built-in models, in display order."""
    return list(BUILTINS)


# ---- device and dtype ----------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """Turn --device (auto|cpu|cuda|cuda:N|mps) into a usable device, or raise `UsageError`.

    Args:
        name: "auto" picks cuda, then mps, then cpu.
    """
    name = (name or "auto").strip().lower()
    cuda_ok, mps_ok = torch.cuda.is_available(), _mps_available()
    if name == "auto":
        return torch.device("cuda" if cuda_ok else "mps" if mps_ok else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not mps_ok:
            raise UsageError("--device mps was requested but this PyTorch has no usable MPS device; use --device cpu or auto")
        return torch.device("mps")
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not cuda_ok:
            raise UsageError(
                f"--device {name} was requested but PyTorch {torch.__version__} sees no CUDA GPU; use --device cpu or auto"
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return device
    raise UsageError(f"unknown --device {name!r}; choose auto, cpu, cuda (or cuda:N) or mps")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Turn --dtype (auto|float32|float16|bfloat16) into a torch dtype for `device`.

    auto is float16 on CUDA (the precision SD checkpoints are published and tested in; diffusers
    upcasts the SDXL VAE and SD 2 attention where fp16 overflows) and float32 on CPU and MPS.

    Args:
        name: the --dtype value; "fp16", "fp32", "bf16", "half" are accepted too.
        device: from `resolve_device`.
    """
    name = (name or "auto").strip().lower()
    name = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}.get(name, name)
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"unknown --dtype {name!r}; choose auto, float32, float16 or bfloat16")
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--dtype bfloat16: this GPU does not support bfloat16; use float16")
    return dtype


# ---- fingerprint ---------------------------------------------------------------------------

def fingerprint_pipeline(pipe) -> str:
    """A sha256 hex digest naming a pipeline's weights, fast even for SDXL (it samples, it does not read all).

    Components in sorted name order; for a torch module, its class and each state-dict entry in
    sorted name order: name, shape and the bytes (as float32, on the CPU) of a strided sample of
    at most 4096 elements. The storage dtype is deliberately left out, so fp16 weights and their
    exact fp32 upcast share a fingerprint; `load_model` fingerprints the weights as stored (fp32, or
    their half dtype for a half run: `models/memory.py`) before casting, so CPU/GPU and
    fp32/fp16/bf16 runs of one model share it (`LoadedModel.identity()` carries the dtype separately). The scheduler adds its class and config; a tokenizer its vocabulary.
    A change to a single element that the sample misses goes unnoticed.

    Args:
        pipe: a diffusers `DiffusionPipeline`.
    """
    h = hashlib.sha256(b"conceptkit-fingerprint-v1\n")
    for name, component in sorted(pipe.components.items()):
        if component is None:
            continue
        h.update(f"component {name} {type(component).__name__}\n".encode())
        if isinstance(component, torch.nn.Module):
            for key, tensor in sorted(component.state_dict().items()):
                h.update(f"{key} {tuple(tensor.shape)}\n".encode())
                h.update(_tensor_sample(tensor))
        elif hasattr(component, "get_vocab"):
            vocab = json.dumps(sorted(component.get_vocab().items()), ensure_ascii=True)
            h.update(hashlib.sha256(vocab.encode()).digest())
            h.update(f"max_length {getattr(component, 'model_max_length', None)}\n".encode())
        elif hasattr(component, "config"):
            config = {k: v for k, v in dict(component.config).items() if not k.startswith("_")}
            h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _tensor_sample(tensor: torch.Tensor) -> bytes:
    """At most SAMPLE_PER_TENSOR evenly strided elements of `tensor`, as float32 bytes."""
    flat = tensor.detach().reshape(-1)
    step = max(1, -(-flat.numel() // SAMPLE_PER_TENSOR))  # ceil: never more than the budget
    sample = flat[::step].to(device="cpu", dtype=torch.float32)
    return sample.contiguous().numpy().tobytes()


# ---- loading -------------------------------------------------------------------------------

def load_model(spec: str, *, device: str = "auto", dtype: str = "auto", config: str | Path | None = None,
               offload: str = "none") -> LoadedModel:
    """Load `spec` (downloading a missing hub id unless offline) and return it on the chosen device and dtype.

    Args:
        spec: a built-in name (toy, tiny-sd, tiny-sdxl), a Hugging Face id (org/name),
            a local diffusers folder, or a single `.safetensors` checkpoint (LDM layout).
        device: auto|cpu|cuda|mps.
        dtype: auto|float32|float16|bfloat16.
        config: for a single file only: a diffusers folder or cached hub id holding the configs
            and tokenizers; by default the architecture's canonical repo (downloaded if missing).
        offload: none|model|sequential: diffusers' CPU offload, CUDA only (`memory.apply_offload`).
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    offload = check_offload(offload, torch_device)
    spec = str(spec)
    if config is not None and not is_single_file_spec(spec):
        raise UsageError("--config applies to single-file (.safetensors) checkpoints only")

    # 1. find the weights and check what can be checked cheaply (before diffusers is even imported)
    load, source, names, file_arch = _locate(spec, config, torch_dtype)

    # 2. load them on the CPU: fp32, or for a half run each component in the half dtype it is stored in
    with _quiet_loading():
        pipe = load()

    # 3. check what was loaded, fingerprint it, then move and cast it
    arch = _pipeline_arch(pipe, spec)
    if file_arch is not None and arch != "sdxl":
        arch = file_arch  # a single file's text-encoder layout tells SD 1.x (CLIP) from SD 2.x (OpenCLIP)
    for tokenizer in (getattr(pipe, name, None) for name in ("tokenizer", "tokenizer_2", "tokenizer_3")):
        if tokenizer is not None:
            check_tokenizer(tokenizer, spec)
    fingerprint = fingerprint_pipeline(pipe)
    steps, guidance = _sampling_defaults(spec, names, pipe)
    pipe.set_progress_bar_config(disable=True)
    if arch == "flux" and torch_dtype == torch.float16 and str(dtype or "auto").lower() == "auto":
        torch_dtype = torch.bfloat16  # FLUX.1 overflows in float16 (its activations exceed 65504); BFL ships bf16
    move_and_cast(pipe, torch_device if offload == "none" else torch.device("cpu"), torch_dtype)
    apply_offload(pipe, offload, torch_device)
    return LoadedModel(
        pipe=pipe, spec=spec, arch=arch, source=source, fingerprint=fingerprint, device=torch_device,
        dtype=torch_dtype, default_steps=steps, default_guidance=guidance,
    )


def _locate(
    spec: str, config: str | Path | None, target: torch.dtype = torch.float32
) -> tuple[Callable[[], DiffusionPipeline], str, str, str | None]:
    """(a loader of the pipeline on the CPU as stored for a run in `target`, its source, the names to read
    sampling hints from, the architecture a single file's keys show or None).

    Everything that can fail without reading weights fails here, in a fraction of a second.
    """
    if spec in TINY_NAMES:
        return (lambda: build_tiny(spec)), "builtin", spec, None
    if spec in FULL_NAMES:
        return (lambda: build_full(spec)), "builtin", spec, None
    if spec in FLOW_TINY_NAMES:
        return (lambda: build_flow_tiny(spec)), "builtin", spec, None
    if spec == "toy":
        folder = toy_folder()
        check_folder(folder, spec)
        return (lambda: load_folder(folder, spec, target)), "builtin", spec, None
    if spec == "toy-turbo":  # its name makes `_sampling_defaults` pick Turbo's defaults: 1 step, no guidance
        folder = turbo_folder()
        check_folder(folder, spec)
        return (lambda: load_folder(folder, spec, target)), "builtin", spec, None
    if looks_like_path(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"no such file or folder: {spec}")
        if path.is_file():
            info = inspect_single_file(path)
            config_dir, label = resolve_single_file_config(info.config_key, config, path)
            check_config_matches(info, config_dir, label)
            names = f"{path.name} {Path(label).name}"
            return (lambda: load_single_file(info, config_dir, label, target)), "single-file", names, info.arch
        check_folder(path, spec)
        return (lambda: load_folder(path, spec, target)), "folder", path.resolve().name, None
    if HUB_ID_RE.match(spec):
        snapshot = hub.resolve(pipeline_need(spec, target in (torch.float16, torch.bfloat16)))
        check_folder(snapshot, spec)
        return (lambda: load_folder(snapshot, spec, target)), "hub-cache", spec, None
    choices = ", ".join(b.name for b in BUILTINS)
    raise ModelNotFoundError(
        f"unknown model {spec!r}: not a built-in ({choices}), a Hugging Face id (org/name), "
        "an existing folder or a .safetensors file"
    )


@contextmanager
def _quiet_loading():
    """Silence loading chatter: progress bars, the dtype-argument deprecation, a spurious cast warning."""
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging

    was_on = d_logging.is_progress_bar_enabled(), t_logging.is_progress_bar_enabled()
    d_logging.disable_progress_bar()
    t_logging.disable_progress_bar()
    # diffusers' ModelMixin.to warns "modules that should be kept in float32: []" on every cast.
    modeling_logger = logging.getLogger("diffusers.models.modeling_utils")
    spurious = _DropMessage("should be kept in float32: []")
    modeling_logger.addFilter(spurious)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            yield
    finally:
        modeling_logger.removeFilter(spurious)
        if was_on[0]:
            d_logging.enable_progress_bar()
        if was_on[1]:
            t_logging.enable_progress_bar()


class _DropMessage(logging.Filter):
    """A logging filter that drops records containing a given text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _pipeline_arch(pipe, spec: str) -> str:
    """The architecture: "sdxl", "flux", "sd3"; for SD, "sd2" when the UNet's context is 1024 wide (OpenCLIP-H), else "sd1"."""
    if type(pipe).__name__ == "StableDiffusionXLPipeline":
        return "sdxl"
    if type(pipe).__name__ in FLOW_PIPELINES:
        return FLOW_PIPELINES[type(pipe).__name__]
    if type(pipe).__name__ != "StableDiffusionPipeline":
        raise UnsupportedModelError(f"{spec} loaded as {type(pipe).__name__}; conceptkit handles SD 1.x, SD 2.x, SDXL, FLUX.1 and SD3")
    return "sd2" if pipe.unet.config.cross_attention_dim == 1024 else "sd1"


def check_tokenizer(tokenizer, spec: str) -> None:
    """Refuse a degenerate tokenizer (the 2-token hub fallback maps every word to its unknown token).

    Args:
        tokenizer: a loaded `CLIPTokenizer`.
        spec: the model, for the message.
    """
    unk = tokenizer.unk_token_id
    size = len(tokenizer)
    probes = [tokenizer(w, add_special_tokens=False).input_ids for w in PROBE_WORDS]
    if size < 256 or any(not ids or all(i == unk for i in ids) for ids in probes):
        raise UnsupportedModelError(
            f"{spec}: its tokenizer is unusable ({size} tokens; common words map to the unknown token); "
            "the model's tokenizer files are missing or broken"
        )


def _sampling_defaults(spec: str, names: str, pipe) -> tuple[int, float]:
    """(steps, guidance) that suit the model: few-step distilled models need few steps and little guidance.

    Detection: the scheduler class (LCMScheduler) and the model's names (the hub id, or the last
    component of the folder, file and config paths) containing turbo / lcm / dmd / lightning.
    """
    if spec == "toy":
        try:
            found = toy_defaults()
            return int(found.get("steps", 20)), float(found.get("guidance", 7.5))
        except ImportError:
            return 20, 7.5
    if spec in TINY_NAMES:
        return 4, 7.5
    if type(pipe).__name__ in FLOW_PIPELINES:
        return flow_defaults(spec, names, pipe)
    text = names.lower()
    lcm = type(pipe.scheduler).__name__ == "LCMScheduler" or "lcm" in text
    if "turbo" in text:
        return 1, 0.0  # SD-Turbo / SDXL-Turbo: one step, no guidance (adversarial diffusion distillation)
    if "dmd" in text or "lightning" in text:
        return 4, 0.0  # DMD2 / SDXL-Lightning: 4 steps, trained without CFG
    if lcm:
        # An LCM with a guidance embedding (time_cond_proj_dim) takes w ~8 without doubling the batch;
        # an LCM-LoRA style model wants plain sampling (guidance 1 turns CFG off).
        return 4, 8.0 if pipe.unet.config.time_cond_proj_dim is not None else 1.0
    return 30, 7.5
