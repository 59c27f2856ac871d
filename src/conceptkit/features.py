"""Image encoders: images in [0, 1] -> unit-norm embeddings, batched and differentiable.

SliderSpace (Gandikota et al., 2025, Sec. 3.1) takes principal directions in a semantic image
embedding (CLIP; DINOv2 and raw pixels as ablations, Sec. 5). Every encoder here is an
`nn.Module` taking (N, 3, H, W) images in [0, 1] and returning (N, d) L2-normalised rows, so
the slider loss can backpropagate through it. Encoders that have a text tower (CLIP, the toy
CLIP) also embed words, which is what slider labelling needs.

Specs (`--encoder`): `auto`, `pixel`, `pixel:<side>`, `clip:<hub id or folder>`,
`dinov2:<hub id or folder>`, `toy` (the toy world's CLIP). A hub id is taken from the local
Hugging Face cache, or downloaded into it when missing (`hub`); transformers only reads folders.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from conceptkit.errors import ModelNotFoundError, UsageError
from conceptkit.models import hub
from conceptkit.tensor_files import pickle_weights
from conceptkit.toy.model import clip_path

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUTO_CLIP = "openai/clip-vit-large-patch14"  # `auto` for real SD models (about 1.7 GB, downloaded on first use)


class ImageEncoder(nn.Module):
    """Base: `forward(images (N, 3, H, W) in [0, 1]) -> (N, d)` unit rows; frozen, eval mode."""

    spec: str = ""
    dim: int = 0

    def has_text(self) -> bool:
        return False

    def embed_text(self, texts: list[str]) -> torch.Tensor:  # pragma: no cover - overridden
        raise UsageError(f"encoder {self.spec} has no text tower")

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Embed without gradients, in chunks: (N, 3, H, W) -> (N, d) float32 on the CPU."""
        out = [self(chunk.to(self._device())).float().cpu() for chunk in images.split(batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.dim)

    def _device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _freeze(self) -> ImageEncoder:
        self.requires_grad_(False)
        return self.eval()


class PixelEncoder(ImageEncoder):
    """The pixel ablation: area-downsample to side x side, flatten, centre per image, normalise."""

    def __init__(self, side: int = 8):
        super().__init__()
        if not 1 <= side <= 256:
            raise UsageError(f"pixel encoder side must be in [1, 256], got {side}")
        self.side, self.dim, self.spec = side, 3 * side * side, f"pixel:{side}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(images.float(), self.side).flatten(1)
        return F.normalize(x - 0.5, dim=-1)


def _resize(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    x = images.float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class ClipEncoder(ImageEncoder):
    """A transformers CLIP: image embeds (projection) of the vision tower; text tower if present."""

    def __init__(self, spec: str, folder: str, *, toy: bool = False):
        super().__init__()
        from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

        self.spec, self.toy = spec, toy
        check_encoder_weights(folder, spec)
        config = _load_config(folder, spec)
        if isinstance(config, CLIPConfig) or getattr(config, "model_type", "") == "clip":
            self.model = CLIPModel.from_pretrained(folder, use_safetensors=True)
            vision = self.model.config.vision_config
            self.dim = self.model.config.projection_dim
        else:
            self.model = CLIPVisionModelWithProjection.from_pretrained(folder, use_safetensors=True)
            vision = self.model.config
            self.dim = vision.projection_dim
        self.size = int(vision.image_size)
        self.tokenizer = None
        if isinstance(self.model, CLIPModel):
            try:
                from transformers import CLIPTokenizer

                tok = CLIPTokenizer.from_pretrained(folder)
                self.tokenizer = tok if len(tok) > 2 else None  # STACK-NOTES: a broken offline tokenizer has 2 tokens
            except (OSError, ValueError, TypeError):
                self.tokenizer = None
        self._freeze()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.toy:  # the toy CLIP was trained on [-1, 1] images at 32x32
            x = F.interpolate(images.float(), size=(self.size, self.size), mode="bilinear") if images.shape[-1] != self.size else images.float()
            x = x * 2 - 1
        else:
            x = _resize(images, self.size, CLIP_MEAN, CLIP_STD)
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=x)
        else:
            out = self.model(pixel_values=x).image_embeds
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(out.float(), dim=-1)

    def has_text(self) -> bool:
        return self.tokenizer is not None

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise UsageError(f"encoder {self.spec} has no text tower or tokenizer")
        ids = self.tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt").input_ids
        out = self.model.get_text_features(input_ids=ids.to(self._device()))
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(out.float(), dim=-1).cpu()


class Dinov2Encoder(ImageEncoder):
    """A transformers Dinov2Model: the CLS token of the last layer (after its layer norm)."""

    def __init__(self, spec: str, folder: str):
        super().__init__()
        from transformers import Dinov2Model

        self.spec = spec
        check_encoder_weights(folder, spec)
        self.model = Dinov2Model.from_pretrained(folder, use_safetensors=True)
        self.dim = int(self.model.config.hidden_size)
        patch = int(self.model.config.patch_size)
        self.size = max(patch, (int(self.model.config.image_size) // patch) * patch)
        self._freeze()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _resize(images, self.size, IMAGENET_MEAN, IMAGENET_STD)
        return F.normalize(self.model(pixel_values=x).last_hidden_state[:, 0].float(), dim=-1)


def check_encoder_weights(folder: str, spec: str) -> None:
    """Refuse an encoder folder whose weights are pickles only (.bin, .pt, .ckpt): never loaded."""
    path = Path(folder)
    if path.is_dir() and not any(path.glob("*.safetensors")) and (pickled := pickle_weights(path)):
        raise UsageError(f"--encoder {spec}: {pickled[0]} is a pickled weights file; conceptkit loads only .safetensors "
                         f"weights (convert it, e.g. save_pretrained(..., safe_serialization=True))")


def _load_config(folder: str, spec: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"encoder {spec}: no readable model config at {folder}; pass a transformers "
                                 f"model folder or a Hugging Face id") from exc


def _locate(name: str, spec: str) -> str:
    """A local folder as is; a hub id from the local HF cache, downloaded into it when missing."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(f"encoder {spec}: {name} is not a model folder or a Hugging Face id (org/name)")
    return str(hub.resolve(_encoder_need(name, spec)))


def _encoder_need(name: str, spec: str) -> hub.Need:
    kind = spec.partition(":")[0]
    return hub.Need(name, "encoder", role="encoder",
                    alternative=f"or pass a local folder (--encoder {kind}:/path/to/folder)")


def encoder_hub_needs(spec: str, model_spec: str | None = None) -> list[hub.Need]:
    """The hub repository the encoder `spec` needs when it is not in the local cache yet ([] otherwise; no network)."""
    spec = resolve_spec(check_spec(spec), model_spec)
    kind, _, arg = spec.partition(":")
    if kind not in ("clip", "dinov2") or Path(arg).expanduser().exists() or arg.startswith((".", "/", "~")) or arg.count("/") != 1:
        return []
    need = _encoder_need(arg, spec)
    return [] if hub.local_state(need)[0] is not None else [need]


def resolve_spec(spec: str, model_spec: str | None) -> str:
    """What `auto` means for a model: the toy CLIP for `toy`, pixels for the random tiny models
    (they draw noise; a semantic encoder would add nothing), CLIP ViT-L/14 otherwise."""
    spec = (spec or "auto").strip()
    if spec != "auto":
        return spec
    if model_spec in ("toy", "toy-turbo"):
        return "toy"
    if model_spec in ("tiny-sd", "tiny-sdxl", "tiny-flux", "tiny-sd3"):
        return "pixel"
    return f"clip:{AUTO_CLIP}"


def check_spec(spec: str) -> str:
    """Refuse a malformed `--encoder` before any work starts; returns it stripped."""
    spec = (spec or "auto").strip()
    kind, _, arg = spec.partition(":")
    if kind == "pixel" and arg:
        try:
            side = int(arg)
        except ValueError:
            raise UsageError(f"--encoder pixel:<side> wants an integer side, got {arg!r}") from None
        if not 1 <= side <= 256:
            raise UsageError(f"pixel encoder side must be in [1, 256], got {side}")
    elif not (spec == "auto" or kind in ("pixel", "toy") or (kind in ("clip", "dinov2") and arg)):
        raise UsageError(f"unknown --encoder {spec!r}; use auto, pixel, pixel:<side>, toy, clip:<id or folder> "
                         f"or dinov2:<id or folder>")
    if kind in ("clip", "dinov2", "toy") and arg and Path(arg).expanduser().is_dir():
        check_encoder_weights(str(Path(arg).expanduser()), spec)  # pickled weights are refused before any work
    return spec


def load_encoder(spec: str, model_spec: str | None = None, device: torch.device | str = "cpu") -> ImageEncoder:
    """Build the encoder named by `spec` (see the module docstring), frozen, on `device`."""
    spec = resolve_spec(check_spec(spec), model_spec)
    kind, _, arg = spec.partition(":")
    if kind in ("toy", "clip", "dinov2"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight-loading bars are chatter; our own bar reports progress
    if kind == "pixel":
        enc: ImageEncoder = PixelEncoder(int(arg) if arg else 8)
    elif kind == "toy":
        folder = Path(arg) if arg else clip_path()
        if not (folder / "config.json").exists():
            raise ModelNotFoundError(f"no toy CLIP at {folder}; train it with `python -m conceptkit.toy.train --stages clip`")
        enc = ClipEncoder(spec, str(folder), toy=True)
    elif kind == "clip" and arg:
        enc = ClipEncoder(spec, _locate(arg, spec))
    elif kind == "dinov2" and arg:
        enc = Dinov2Encoder(spec, _locate(arg, spec))
    else:  # pragma: no cover - check_spec refused it
        raise UsageError(f"unknown --encoder {spec!r}")
    return enc.to(device)
