"""Every client loads every key of the kohya export, on the real SD 1.5 and SDXL UNets (meta device).

The clients' key maps are rebuilt from their naming rules in tests/_clients.py; diffusers, which is
installed, converts the file itself. Targets: the default (cross-attention k/v), every linear, every conv.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open

from _clients import a1111_layer_mapping, a1111_load, a1111_sd_version, comfy_key_map, comfy_load, fits, kohya_modules
from conceptkit.sliders.kohya import export_kohya, kohya_key, sd_scripts_skips
from conceptkit.sliders.bank import DEFAULT_TARGETS, SliderFactors, SliderLoraConfig, install_sliders

ARCH_OF = {"random-sd15": "sd1", "random-sdxl": "sdxl"}


@pytest.fixture(scope="module", params=["random-sd15", "random-sdxl"])
def unet(request):
    """The full-size UNet on the meta device: real module names and shapes, no memory."""
    from diffusers import UNet2DConditionModel

    from conceptkit.models.full import SD15_UNET, SDXL_UNET

    with torch.device("meta"):
        model = UNet2DConditionModel(**(SD15_UNET if request.param == "random-sd15" else SDXL_UNET))
    model.spec_name = request.param
    return model


def _targets(unet, which: str) -> str:
    if which == "default":
        return DEFAULT_TARGETS
    kind = torch.nn.Linear if which == "every-linear" else torch.nn.Conv2d
    return "|".join(re.escape(n) for n, m in unet.named_modules() if isinstance(m, kind))


def _factors(unet, targets: str, rank: int = 2) -> SliderFactors:
    """A rank-2 slider on `targets`, shaped by the bank (which picks the modules and their factor shapes)."""
    bank = install_sliders(unet, SliderLoraConfig(1, rank=rank, target_modules=targets))
    try:
        return SliderFactors({n: torch.zeros(s.a_shape(rank)) for n, s in zip(bank.module_names, bank.specs)},
                             {n: torch.zeros(s.file_b_shape(rank)) for n, s in zip(bank.module_names, bank.specs)},
                             rank=rank, alpha=1.0)
    finally:
        bank.remove()


def _shapes(path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _pairs(shapes, prefix):
    return shapes[f"{prefix}.lora_down.weight"], shapes[f"{prefix}.lora_up.weight"]


@pytest.mark.parametrize("which", ["default", "every-linear", "conv"])
def test_every_client_maps_every_exported_key_to_a_weight_of_the_right_shape(unet, which, tmp_path):
    arch = ARCH_OF[unet.spec_name]
    factors = _factors(unet, _targets(unet, which))
    warnings: list[str] = []
    path = export_kohya(factors, tmp_path / "k.safetensors", arch=arch, warn=warnings.append)
    shapes = _shapes(path)
    prefixes = {k.split(".", 1)[0] for k in shapes}
    assert len(shapes) == 3 * len(factors.lora_A) == 3 * len(prefixes)
    if which == "default":
        assert len(prefixes) == (32 if arch == "sd1" else 140)  # SD 1.5: 16 transformers; SDXL: 70

    # ComfyUI (and Forge, which ships its loader): every key consumed, each pair fits its weight
    patched, not_loaded = comfy_load(shapes, comfy_key_map(unet))
    assert not_loaded == [] and set(patched) == prefixes
    assert all(fits(*_pairs(shapes, p), w.shape) for p, w in patched.items())

    # AUTOMATIC1111: every key matched to a module of the LDM model
    matched, failed = a1111_load(shapes, a1111_layer_mapping(unet))
    assert failed == [] and set(matched) == prefixes
    assert all(fits(*_pairs(shapes, p), w.shape) for p, w in matched.items())

    # kohya sd-scripts: everything but the embeddings / conv_in / conv_out it never wraps, and we said so
    kohya = kohya_modules(unet, sdxl=arch == "sdxl")
    skipped = {kohya_key(n, arch) for n in sd_scripts_skips(factors.lora_A)}
    assert prefixes - set(kohya) == skipped
    assert all(fits(*_pairs(shapes, p), kohya[p].shape) for p in prefixes - skipped)
    assert (len(warnings) == 1) == bool(skipped) and (which != "every-linear" or len(skipped) >= 2)
    if skipped:
        assert "\n" not in warnings[0] and f"{len(skipped)} of the {len(prefixes)}" in warnings[0]

    # diffusers: its own converter, back to the modules we trained, with the shapes peft will build
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    state, _alphas = pipeline.lora_state_dict(str(path), unet_config=unet.config)
    assert all(k.startswith("unet.") for k in state)
    state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    modules = {k.rsplit(".lora_", 1)[0] for k in state}
    assert modules == set(factors.lora_A) and len(state) == 2 * len(modules)
    for name in modules:
        down, up = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
        assert fits(tuple(down.shape), tuple(up.shape), tuple(unet.get_submodule(name).weight.shape)), name


@pytest.mark.parametrize("name", ["tiny-sdxl", "random-sdxl"])
def test_ldm_names_agree_with_the_checkpoint_writer_for_every_module(name):
    """conceptkit's module-name map and tests/_ldm.py's checkpoint key map (read back by diffusers) agree."""
    from _clients import module_weights
    from diffusers import UNet2DConditionModel

    from conceptkit.models.full import SDXL_UNET
    from conceptkit.models.ldm_names import ldm_module_name
    from conceptkit.models.tiny import build_tiny

    if name == "tiny-sdxl":
        unet = build_tiny(name).unet
    else:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**SDXL_UNET)
    weights = module_weights(unet)
    assert len(weights) > 100
    for module, (ldm, _) in weights.items():
        assert ldm_module_name(module) == ldm, module


def test_sdxl_keys_use_the_ldm_names_sd_scripts_wants(tmp_path):
    from diffusers import UNet2DConditionModel

    from conceptkit.models.full import SDXL_UNET

    assert kohya_key("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "sdxl") == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    assert kohya_key("down_blocks.1.resnets.0.time_emb_proj", "sdxl") == "lora_unet_input_blocks_4_0_emb_layers_1"
    assert kohya_key("add_embedding.linear_1", "sdxl") == "lora_unet_label_emb_0_0"
    assert kohya_key("up_blocks.0.upsamplers.0.conv", "sdxl") == "lora_unet_output_blocks_2_2_conv"
    assert kohya_key("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "sd1") == \
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{**SDXL_UNET, "layers_per_block": 3})
    from conceptkit.errors import UsageError

    with pytest.raises(UsageError, match="SDXL UNet layout"):
        kohya_key(next(n for n, _ in unet.named_modules() if n.startswith("down_blocks.1.attentions.2.")), "sdxl")
    with pytest.raises(UsageError, match="architecture 'flux'"):
        kohya_key("conv_in", "flux")


@pytest.mark.parametrize(("arch", "version", "ss", "spec"), [
    ("sd1", "SD1", "sd_v1", "stable-diffusion-v1/lora"),
    ("sd2", "SD2", "sd_v2", "stable-diffusion-v2-512/lora"),
    ("sdxl", "SDXL", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
])
def test_the_kohya_header_names_the_base_model_for_a1111_and_modelspec(arch, version, ss, spec, tmp_path):
    factors = SliderFactors({"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": torch.zeros(2, 8)},
                            {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": torch.zeros(4, 2)},
                            rank=2, alpha=2.0)
    path = export_kohya(factors, tmp_path / "k.safetensors", arch=arch, title="person/age", description="older")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert a1111_sd_version(meta) == version
    assert meta["ss_base_model_version"] == ss and meta["modelspec.architecture"] == spec
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("networks.lora", "2", "2.0")
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.title"] == "person/age"
    assert meta["modelspec.description"] == "older"
    # what the export wrote before: our entries only, which A1111 files as SD 1 (hidden beside an SDXL model)
    assert a1111_sd_version({"ss_network_module": "networks.lora", "ss_network_dim": "2"}) == "SD1"


def test_the_sets_own_file_is_for_diffusers_only(tmp_path):
    """ComfyUI's key map has no `unet.<module>.lora_A` names: it would load none of our own file."""
    from conceptkit.models.tiny import build_tiny

    unet = build_tiny("tiny-sd").unet
    bank = install_sliders(unet, SliderLoraConfig(1))
    path = bank.save_slider(0, tmp_path / "s.safetensors")
    shapes = _shapes(path)
    patched, not_loaded = comfy_load(shapes, comfy_key_map(unet))
    assert patched == {} and len(not_loaded) == len(shapes) == 2 * len(bank.module_names)
