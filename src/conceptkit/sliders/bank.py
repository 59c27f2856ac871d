"""Batched multi-slider low-rank LoRA for a diffusers UNet (its files: `sliders/files.py`).

SliderSpace (Gandikota et al., 2025, "SliderSpace: Decomposing the Visual Capabilities of
Diffusion Models", Sec. 3) trains one rank-1 LoRA "slider" per principal direction. Here all
K sliders live side by side on the same layers, and every sample of one UNet batch is routed
to its own slider, so one forward/backward pass trains all K (no pass per slider).

For a target linear layer y = W x, sample n of the UNet batch gets

    y_n = W x_n + (alpha / r) * sum_k w[n, k] * B_k A_k x_n,   A: (K, r, in), B: (K, out, r)

and a target Conv2d the same with A x replaced by a conv with the layer's kernel to r channels
(A: (K, r, in, kh, kw); see `sliders/layers.py`),
with w the routing: sparse (one slider per sample, `SliderBank.route(indices, strengths)`) or
dense (any combination, `SliderBank.route_dense(strengths)`). Weight deltas add exactly like
peft adapters under `set_adapters(names, weights)`; strength 0 returns the base output.

Factors are kept in `SliderLoraConfig.master_dtype` (float32 by default, what the optimiser
sees); the LoRA branch is computed in the layer input's dtype (fp32, fp16 or bf16).

Initialisation: A ~ N(0, 1/in), B = 0, both trainable, so each slider starts as the identity.
For rank 1 no identity start can give both factors a gradient on the first backward
(B A = 0 forces A = 0 or B = 0, and dL/dA = B^T G x^T, dL/dB = G (A x)^T): the first backward
moves B only, and A gets its gradient from the second step on (tested). `init_b_std > 0`
trades the exact identity start for gradients on both factors at once.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple

import torch
import torch.utils.checkpoint
from torch import nn

from conceptkit.diffusion import restore_requires_grad, save_requires_grad
from conceptkit.errors import UsageError
from conceptkit.sliders.files import (  # noqa: F401  re-exported: the file format lives there
    CONCEPTKIT_KEY,
    DIFFUSERS_KEY,
    FORMAT,
    RESERVED_KEYS,
    LoadedSlider,
    SliderFactors,
    load_slider_file,
    peft_state_dict,
    save_slider_file,
)
from conceptkit.sliders.kohya import export_kohya, kohya_key  # noqa: F401  re-exported
from conceptkit.sliders.layers import LayerSpec, dense_delta, select_targets, sparse_delta

DEFAULT_TARGETS = r".*attn2\.(to_k|to_v)"  # cross-attention key/value projections



@dataclass(frozen=True)
class SliderLoraConfig:
    """Settings of one bank of K sliders (SliderSpace, Sec. 3.2: rank-1 LoRA per direction)."""

    num_sliders: int  # K, sliders trained side by side
    rank: int = 1  # r of each slider's B A
    alpha: float = 1.0  # LoRA alpha; the branch is scaled by alpha / rank
    target_modules: str = DEFAULT_TARGETS  # regex, re.fullmatch on module names (peft's rule)
    init_a_std: float | None = None  # std of A's gaussian init; None: 1/sqrt(in_features)
    init_b_std: float = 0.0  # std of B's init; 0: every slider starts as the exact identity
    master_dtype: torch.dtype = torch.float32  # dtype the factors are stored and optimised in
    seed: int = 0  # seed of the init

    def __post_init__(self) -> None:
        if self.num_sliders < 1:
            raise ValueError(f"num_sliders must be >= 1, got {self.num_sliders}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.init_a_std is not None and not self.init_a_std > 0:
            raise ValueError(f"init_a_std must be > 0 or None, got {self.init_a_std}")
        if self.init_b_std < 0:
            raise ValueError(f"init_b_std must be >= 0, got {self.init_b_std}")
        if not self.master_dtype.is_floating_point:
            raise ValueError(f"master_dtype must be a float dtype, got {self.master_dtype}")
        re.compile(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class BenchResult(NamedTuple):
    """Seconds per training step (forward + backward) for K sliders, batched and one by one."""

    batched_s: float
    sequential_s: float
    ratio: float  # sequential_s / batched_s; > 1 means the batched pass is faster
    num_sliders: int
    batch_per_slider: int


@dataclass(frozen=True)
class _Routing:
    indices: torch.Tensor | None  # (N,) long, sparse mode; None in dense mode
    coef: torch.Tensor  # sparse: (N,) strength*alpha/r; dense: (N, K) or (K,) (any batch)


class SliderBank(nn.Module):
    """K rank-r sliders injected into the target linears and convs of a UNet through forward hooks.

    The UNet's modules are not replaced: each target gets a forward hook (prepended, so hooks
    registered earlier, such as harvest recorders, see the slider's output). A target that is
    already a peft LoRA layer keeps its adapters; the sliders add on top. Its parameters are
    frozen; `parameters()` of the bank are the only trainable ones. `remove()` restores the
    UNet exactly (hooks off, requires_grad flags back). The bank is an nn.Module: move it
    with `.to(device)` if the UNet moves after installation.

    Routing (batch N = the UNet batch; with classifier-free guidance that is 2x the images:
    diffusers concatenates [uncond; cond], so pass `indices.repeat(2)`, `strengths.repeat(2)`):
      - `route(indices (N,), strengths (N,))`: sample n goes to slider indices[n]
        (-1 = none) at strengths[n]. Cost does not grow with K. For training.
      - `route_dense(strengths (N, K) | (K,) | {k: s})`: sample n gets sum_k s[n, k] B_k A_k.
        A (K,) vector or a dict applies to every sample of any batch (CFG included). For
        generation with several sliders (`--slider age=1.5 --slider size=-1`).
    Without routing (or with all strengths 0) the UNet output is the base output, bitwise.
    Gradient checkpointing re-runs the forward inside backward, after the `with` may have
    exited (torch's default then raises CheckpointError): enable it with
    `unet.enable_gradient_checkpointing(bank.checkpoint)`, which replays the forward's routing.
    """

    def __init__(self, unet: nn.Module, config: SliderLoraConfig):
        super().__init__()
        self.config = config
        found = select_targets(unet, config.target_modules)
        targets = [(t.name, t.module) for t in found]
        layers = [t.layer for t in found]
        self.module_names: tuple[str, ...] = tuple(t.name for t in found)
        self.prefix = "unet" if type(unet).__name__.startswith("UNet") else "transformer"  # FLUX / SD3: transformer
        self.specs: tuple[LayerSpec, ...] = tuple(t.spec for t in found)
        k, r = config.num_sliders, config.rank
        gen = torch.Generator().manual_seed(config.seed)
        self.lora_A, self.lora_B = nn.ParameterList(), nn.ParameterList()
        for spec, layer in zip(self.specs, layers):
            std_a = config.init_a_std or spec.fan_in ** -0.5
            a = torch.randn(k, *spec.a_shape(r), generator=gen) * std_a
            b = torch.randn(k, spec.out_features, r, generator=gen) * config.init_b_std
            device = layer.weight.device
            self.lora_A.append(nn.Parameter(a.to(device, config.master_dtype)))
            self.lora_B.append(nn.Parameter(b.to(device, config.master_dtype)))
        self._routing: _Routing | None = None
        self._saved_grad = save_requires_grad(unet.parameters())
        unet.requires_grad_(False)
        self._handles = [
            m.register_forward_hook(self._make_hook(i), with_kwargs=True, prepend=True)
            for i, (_, m) in enumerate(targets)
        ]

    # ---- routing -------------------------------------------------------------------------
    @property
    def num_sliders(self) -> int:
        return self.config.num_sliders

    def set_routing(self, indices: torch.Tensor | None, strengths: torch.Tensor | float = 1.0) -> None:
        """Sparse routing for the following UNet calls; `indices=None` switches sliders off.

        Args:
            indices: (N,) long, slider of each UNet batch element, -1 for none.
            strengths: (N,) or scalar, slider strength of each element (0 = base model).
        """
        if indices is None:
            self._routing = None
            return
        device = self.lora_A[0].device
        idx = torch.as_tensor(indices).to(device=device, dtype=torch.long)
        s = torch.as_tensor(strengths, dtype=self.config.master_dtype).to(device)
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D (batch,), got shape {tuple(idx.shape)}")
        s = s.expand(idx.shape) if s.ndim == 0 else s
        if s.shape != idx.shape:
            raise ValueError(f"strengths {tuple(s.shape)} do not match indices {tuple(idx.shape)}")
        if idx.numel() and (idx.min() < -1 or idx.max() >= self.num_sliders):
            raise ValueError(f"slider indices must lie in [-1, {self.num_sliders}), got {idx.tolist()}")
        coef = torch.where(idx >= 0, s * self.config.scaling, torch.zeros_like(s))
        self._routing = _Routing(idx.clamp(min=0), coef) if bool((coef != 0).any()) else None

    def set_dense_routing(self, strengths: torch.Tensor | Mapping[int, float] | None) -> None:
        """Dense routing: strengths (N, K) per sample, or (K,) / {k: s} for every sample."""
        if strengths is None:
            self._routing = None
            return
        if isinstance(strengths, Mapping):
            vec = torch.zeros(self.num_sliders, dtype=torch.float64)
            for k, v in strengths.items():
                if not 0 <= int(k) < self.num_sliders:
                    raise ValueError(f"slider index {k} out of range [0, {self.num_sliders})")
                vec[int(k)] += float(v)
            strengths = vec
        w = torch.as_tensor(strengths).to(self.lora_A[0].device, self.config.master_dtype)
        if w.ndim not in (1, 2) or w.shape[-1] != self.num_sliders:
            raise ValueError(f"dense strengths must be (batch, {self.num_sliders}) or "
                             f"({self.num_sliders},), got {tuple(w.shape)}")
        coef = w * self.config.scaling
        self._routing = _Routing(None, coef) if bool((coef != 0).any()) else None

    def route(self, indices: torch.Tensor, strengths: torch.Tensor | float = 1.0):
        """`with bank.route(indices, strengths): unet(...)`; see `set_routing`. Nests."""
        return self._scoped(self.set_routing, indices, strengths)

    def route_dense(self, strengths: torch.Tensor | Mapping[int, float]):
        """`with bank.route_dense({0: 1.5, 3: -1.0}): pipe(...)`; see `set_dense_routing`."""
        return self._scoped(self.set_dense_routing, strengths)

    def checkpoint(self, module: nn.Module, *args):
        """Gradient checkpointing whose recomputation in backward uses the forward's routing:
        `unet.enable_gradient_checkpointing(bank.checkpoint)` (diffusers' signature)."""
        routing = self._routing

        def contexts():
            return contextlib.nullcontext(), self._scoped(self._set_raw, routing)

        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, context_fn=contexts)

    def _set_raw(self, routing: _Routing | None) -> None:
        self._routing = routing

    @contextlib.contextmanager
    def _scoped(self, setter, *args) -> Iterator[None]:
        saved = self._routing
        try:
            setter(*args)
            yield
        finally:
            self._routing = saved

    def _make_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
            routing = self._routing
            if routing is None:
                return None
            x = args[0] if args else kwargs["input"]
            n, dt = x.shape[0], x.dtype
            a, b = self.lora_A[i], self.lora_B[i]  # (K, r, in[, kh, kw]), (K, out, r)
            coef = routing.coef.to(dt)
            if routing.indices is None and coef.ndim == 1:
                coef = coef.expand(n, -1)  # dense (K,): the same sliders on every sample
            if coef.shape[0] != n:
                raise ValueError(f"routing has {coef.shape[0]} entries but "
                                 f"{self.module_names[i]} sees a batch of {n}")
            if routing.indices is not None:  # sparse: gather each sample's slider
                delta = sparse_delta(self.specs[i], x, a[routing.indices].to(dt), b[routing.indices].to(dt), coef)
            else:  # dense: every slider, weighted per sample
                delta = dense_delta(self.specs[i], x, a.to(dt), b.to(dt), coef)
            return output + delta.reshape(output.shape).to(output.dtype)

        return hook

    def remove(self) -> None:
        """Take the hooks off and give the UNet back its requires_grad flags."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        restore_requires_grad(self._saved_grad)
        self._saved_grad = []
        self._routing = None

    # ---- slider files ----------------------------------------------------------------------
    def slider_factors(self, k: int) -> SliderFactors:
        """A detached float32 copy of slider k's factors, file-shaped: A (r, in[, kh, kw]),
        B (out, r) or (out, r, 1, 1) for a conv."""
        self._check_index(k)
        a = {n: p[k].detach().float().cpu().clone() for n, p in zip(self.module_names, self.lora_A)}
        b = {n: p[k].detach().float().cpu().reshape(s.file_b_shape(self.config.rank)).clone()
             for n, p, s in zip(self.module_names, self.lora_B, self.specs)}
        return SliderFactors(lora_A=a, lora_B=b, rank=self.config.rank, alpha=self.config.alpha)

    def slider_state_dict(self, k: int, prefix: str = "unet") -> dict[str, torch.Tensor]:
        """Slider k as a diffusers/peft state dict: `{prefix}.{module}.lora_A.weight` (r, in) and
        `.lora_B.weight` (out, r)."""
        return peft_state_dict(self.slider_factors(k), prefix)

    def save_slider(self, k: int, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
        """Write slider k to one `.safetensors` file that `pipe.load_lora_weights` and
        `unet.load_lora_adapter(path, prefix="unet")` load; see `save_slider_file`."""
        return save_slider_file(self.slider_factors(k), path, metadata, slider_index=k, prefix=self.prefix)

    def set_slider(self, k: int, factors: SliderFactors) -> None:
        """Copy `factors` into slot k; a different alpha/r is folded into B so B A * scale matches."""
        self._check_index(k)
        if set(factors.lora_A) != set(self.module_names):
            missing = sorted(set(self.module_names) ^ set(factors.lora_A))
            raise UsageError(f"slider modules differ from this bank's targets: {missing[:4]} ...")
        if factors.rank != self.config.rank:
            raise UsageError(f"slider rank {factors.rank} != bank rank {self.config.rank}")
        ratio = (factors.alpha / factors.rank) / self.config.scaling
        with torch.no_grad():
            for name, a, b, spec in zip(self.module_names, self.lora_A, self.lora_B, self.specs):
                fa, fb = factors.lora_A[name], factors.lora_B[name]
                if tuple(fa.shape) != tuple(a.shape[1:]) or tuple(fb.shape) != spec.file_b_shape(factors.rank):
                    raise UsageError(f"slider factors for {name} ({tuple(fa.shape)}, {tuple(fb.shape)}) do not fit "
                                     f"this UNet's layer ({tuple(a.shape[1:])}, {spec.file_b_shape(factors.rank)})")
                a[k].copy_(fa)
                b[k].copy_(fb.reshape(b.shape[1:]) * ratio)

    def load_slider(self, k: int, path: str | Path) -> dict[str, str]:
        """Load one of our slider files into slot k; returns the file's caller metadata."""
        loaded = load_slider_file(path)
        self.set_slider(k, loaded.factors)
        return loaded.metadata

    def _check_index(self, k: int) -> None:
        if not 0 <= k < self.num_sliders:
            raise IndexError(f"slider {k} out of range [0, {self.num_sliders})")


def install_sliders(unet: nn.Module, config: SliderLoraConfig) -> SliderBank:
    """Inject K sliders into `unet` (frozen); returns the bank that routes and owns them."""
    return SliderBank(unet, config)


def _to(value, like: torch.Tensor):
    """Move nested inputs to `like`'s device, floats to its dtype."""
    if isinstance(value, dict):
        return {k: _to(v, like) for k, v in value.items()}
    return value.to(like.device, like.dtype if value.is_floating_point() else value.dtype)


def bench_batched_vs_sequential(unet: nn.Module, num_sliders: int, *, batch_per_slider: int = 2,
                                tokens: int = 77, latent_size: int | None = None, repeats: int = 3,
                                seed: int = 0) -> BenchResult:
    """Time one training step for K sliders: one routed pass of K*b samples against K passes of b.

    The sequential side is what per-slider training costs (one UNet pass per slider, here with
    the same hooks routed to one slider). Best of `repeats` after one warm-up. Installs its own
    bank and removes it; the UNet is left as found.

    Args:
        unet: a diffusers UNet2DConditionModel (SD1/SD2/SDXL-style conditioning).
        num_sliders: K.
        batch_per_slider: b, samples per slider per step.
        tokens: text context length T; latent_size: H = W of the latents (default: config).
    """
    cfg = unet.config
    size = latent_size or cfg.sample_size
    p = next(unet.parameters())
    g = torch.Generator().manual_seed(seed)
    n = num_sliders * batch_per_slider

    def inputs(m: int) -> dict:
        kw = {"sample": torch.randn(m, cfg.in_channels, size, size, generator=g),
              "timestep": torch.randint(0, 1000, (m,), generator=g),
              "encoder_hidden_states": torch.randn(m, tokens, cfg.cross_attention_dim, generator=g)}
        if cfg.addition_embed_type == "text_time":  # SDXL: pooled text and size/crop ids
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(m, pooled, generator=g),
                                       "time_ids": torch.randn(m, 6, generator=g)}
        return _to(kw, p)

    batch_in = inputs(n)
    chunk_in = inputs(batch_per_slider)
    bank = install_sliders(unet, SliderLoraConfig(num_sliders, seed=seed))
    try:
        def batched() -> None:
            idx = torch.arange(num_sliders).repeat_interleave(batch_per_slider)
            with bank.route(idx, 1.0):
                unet(**batch_in).sample.square().mean().backward()

        def sequential() -> None:
            for k in range(num_sliders):
                with bank.route(torch.full((batch_per_slider,), k), 1.0):
                    unet(**chunk_in).sample.square().mean().backward()

        times = []
        for step in (batched, sequential):
            step()  # warm-up
            best = float("inf")
            for _ in range(repeats):
                if p.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step()
                if p.device.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            times.append(best)
    finally:
        bank.remove()
    return BenchResult(times[0], times[1], times[1] / times[0], num_sliders, batch_per_slider)
