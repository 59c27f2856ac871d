"""Batched multi-slider LoRA: routing, gradients, exactness, and equivalence with peft/diffusers/kohya files."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from conceptkit.errors import UsageError
from conceptkit.sliders.bank import (
    BenchResult,
    SliderLoraConfig,
    bench_batched_vs_sequential,
    export_kohya,
    install_sliders,
    kohya_key,
    load_slider_file,
)

TOKENS = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny UNet's ops are too small to gain from threads; on a shared 2-core machine two
    threads per process make a forward pass about 50x slower (spinning). Restored afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32,
    ).eval()


def inputs(n: int, seed: int = 1, size: int = 8, ctx: int = 32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randn(n, TOKENS, ctx, generator=g))


def randomise(bank, std: float = 0.5, seed: int = 2) -> None:
    """Give every slider non-zero B (and fresh A) so that its effect on the output is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in zip(bank.lora_A, bank.lora_B):
            a.copy_(torch.randn(a.shape, generator=g) * a.shape[-1] ** -0.5 * 2)
            b.copy_(torch.randn(b.shape, generator=g) * std)


def run(unet, x, t, e):
    with torch.no_grad():
        return unet(x, t, e).sample


def per_slider_grad_norms(params) -> torch.Tensor:
    """(K,) gradient norm of each slider over all layers."""
    return torch.stack([p.grad.flatten(1).norm(dim=1) for p in params]).norm(dim=0)


# ---- gradients and trainability -----------------------------------------------------------------
def test_only_sliders_train_and_both_factors_get_gradient():
    unet = tiny_unet()
    bank = install_sliders(unet, SliderLoraConfig(num_sliders=3))
    assert not any(p.requires_grad for p in unet.parameters() if all(p is not q for q in bank.parameters()))
    assert all(p.requires_grad for p in bank.parameters())
    opt = torch.optim.AdamW(bank.parameters(), lr=1e-2)
    x, t, e = inputs(6)
    idx = torch.tensor([0, 1, 2, 0, 1, 2])

    def step():
        opt.zero_grad()
        with bank.route(idx, 1.0):
            (unet(x, t, e).sample - x).square().mean().backward()

    step()
    # identity start (B = 0): B gets gradient for every slider; A's first gradient is exactly 0
    assert (per_slider_grad_norms(bank.lora_B) > 1e-6).all()
    assert per_slider_grad_norms(bank.lora_A).max() == 0
    assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)
    opt.step()
    step()  # after one step, A gets gradient too, for every slider
    assert (per_slider_grad_norms(bank.lora_A) > 1e-8).all()
    assert (per_slider_grad_norms(bank.lora_B) > 1e-6).all()


def test_init_b_std_gives_both_factors_gradient_at_first_backward():
    unet = tiny_unet()
    bank = install_sliders(unet, SliderLoraConfig(num_sliders=2, init_b_std=1e-3))
    x, t, e = inputs(2)
    with bank.route(torch.tensor([0, 1]), 1.0):
        unet(x, t, e).sample.square().mean().backward()
    assert (per_slider_grad_norms(bank.lora_A) > 0).all()
    assert (per_slider_grad_norms(bank.lora_B) > 0).all()


def test_training_step_reduces_loss_of_every_slider_in_one_pass():
    """Toy objective: slider k at strength s moves the UNet output by s * v_k. One pass per step."""
    unet = tiny_unet()
    k_sliders, per = 3, 2
    bank = install_sliders(unet, SliderLoraConfig(num_sliders=k_sliders, init_b_std=0.0))
    x, t, e = inputs(k_sliders * per)
    idx = torch.arange(k_sliders).repeat_interleave(per)
    strength = torch.tensor([1.0, -1.0] * k_sliders)
    directions = torch.randn(k_sliders, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 0.05
    target = run(unet, x, t, e) + strength[:, None, None, None] * directions[idx]
    opt = torch.optim.AdamW(bank.parameters(), lr=5e-3)

    def losses() -> torch.Tensor:  # (K,) loss of each slider
        with bank.route(idx, strength):
            err = (unet(x, t, e).sample - target).square().flatten(1).mean(1)
        return torch.zeros(k_sliders).index_add(0, idx, err) / per

    first = losses().detach()
    for _ in range(15):
        opt.zero_grad()
        losses().sum().backward()
        opt.step()
    last = losses().detach()
    assert (last < 0.9 * first).all(), (first, last)


def test_gradient_checkpointing_recomputes_with_the_forward_routing():
    unet = tiny_unet().train()
    bank = install_sliders(unet, SliderLoraConfig(num_sliders=2))
    randomise(bank)
    x, t, e = inputs(2)
    idx = torch.tensor([0, 1])

    def grads(backward_inside: bool) -> list[torch.Tensor]:
        bank.zero_grad()
        with bank.route(idx, torch.tensor([1.0, -2.0])):
            loss = (unet(x, t, e).sample - x).square().mean()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        return [p.grad.clone() for p in bank.parameters()]

    want = grads(True)
    unet.enable_gradient_checkpointing()  # torch's own recomputes without the routing, and notices
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        grads(False)
    unet.enable_gradient_checkpointing(bank.checkpoint)
    for g, w in zip(grads(False), want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


# ---- routing and exactness ---------------------------------------------------------------------
def test_routing_isolates_sliders():
    unet = tiny_unet()
    bank = install_sliders(unet, SliderLoraConfig(num_sliders=3))
    randomise(bank)
    x, t, e = inputs(4)
    idx, s = torch.tensor([1, 2, 1, 0]), torch.tensor([1.0, 1.0, -2.0, 1.0])
    with bank.route(idx, s):
        before = run(unet, x, t, e)
    with torch.no_grad():
        for a, b in zip(bank.lora_A, bank.lora_B):  # change slider 2 only
            a[2].mul_(-3.0)
            b[2].add_(1.0)
    with bank.route(idx, s):
        after = run(unet, x, t, e)
    routed_elsewhere = idx != 2
    assert torch.equal(after[routed_elsewhere], before[routed_elsewhere])
    assert (after[1] - before[1]).abs().max() > 1e-3
    # and gradients only reach the sliders that were routed
    with bank.route(torch.tensor([1, 1, 1, -1]), 1.0):
        unet(x, t, e).sample.square().mean().backward()
    norms = per_slider_grad_norms(bank.lora_B)
    assert norms[1] > 0 and norms[0] == 0 and norms[2] == 0


def test_strength_zero_is_the_base_model_bitwise():
    unet = tiny_unet()
    x, t, e = inputs(4)
    base = run(unet, x, t, e)
    bank = install_sliders(unet, SliderLoraConfig(num_sliders=3))
    randomise(bank)
    assert torch.equal(run(unet, x, t, e), base)  # no routing
    with bank.route(torch.tensor([0, 1, 2, 0]), 0.0):
        assert torch.equal(run(unet, x, t, e), base)
    with bank.route_dense(torch.zeros(3)):
        assert torch.equal(run(unet, x, t, e), base)
    with bank.route(torch.tensor([0, -1, 2, 1]), torch.tensor([1.0, 1.0, 0.0, -1.0])):
        mixed = run(unet, x, t, e)
    assert torch.equal(mixed[1:3], base[1:3])  # index -1 and strength 0 inside a live batch
    assert (mixed[0] - base[0]).abs().max() > 1e-3 and (mixed[3] - base[3]).abs().max() > 1e-3


def test_dense_one_hot_equals_sparse_and_sliders_add_linearly():
    unet = tiny_unet()
    bank = install_sliders(unet, SliderLoraConfig(num_sliders=3, rank=2, alpha=3.0))
    randomise(bank)
    x, t, e = inputs(3)
    idx, s = torch.tensor([2, 0, 1]), torch.tensor([1.5, -0.5, 2.0])
    dense = torch.zeros(3, 3)
    dense[torch.arange(3), idx] = s
    with bank.route(idx, s):
        sparse_out = run(unet, x, t, e)
    with bank.route_dense(dense):
        dense_out = run(unet, x, t, e)
    torch.testing.assert_close(dense_out, sparse_out, atol=1e-5, rtol=0)
    # the weight deltas add: at a target layer, delta(1.5 e0 - 1 e2) = 1.5 delta(e0) - delta(e2)
    layer = unet.get_submodule(bank.module_names[0])
    h = torch.randn(5, TOKENS, layer.in_features)
    with torch.no_grad():
        y0 = layer(h)
        with bank.route_dense({0: 1.0}):
            d0 = layer(h) - y0
        with bank.route_dense({2: 1.0}):
            d2 = layer(h) - y0
        with bank.route_dense({0: 1.5, 2: -1.0}):
            d02 = layer(h) - y0
    assert d0.abs().max() > 1e-2 and d2.abs().max() > 1e-2
    torch.testing.assert_close(d02, 1.5 * d0 - d2, atol=1e-6, rtol=1e-5)


def test_routing_must_match_the_unet_batch():
    unet = tiny_unet()
    bank = install_sliders(unet, SliderLoraConfig(num_sliders=2))
    randomise(bank)
    x, t, e = inputs(4)
    with bank.route(torch.tensor([0, 1]), 1.0), pytest.raises(ValueError, match="batch of 4"):
        run(unet, x, t, e)
    # classifier-free guidance doubles the batch: repeat the routing for [uncond; cond]
    with bank.route(torch.tensor([0, 1]).repeat(2), 1.0):
        run(unet, x, t, e)
    with pytest.raises(ValueError, match="indices must lie"):
        bank.set_routing(torch.tensor([0, 2]))


def test_remove_restores_the_unet_exactly():
    unet = tiny_unet()
    unet.conv_in.weight.requires_grad_(True)
    unet.conv_out.weight.requires_grad_(False)
    x, t, e = inputs(2)
    base = run(unet, x, t, e)
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    modules = dict(unet.named_modules())
    bank = install_sliders(unet, SliderLoraConfig(num_sliders=2))
    randomise(bank)
    with bank.route(torch.tensor([0, 1]), 1.0):
        assert not torch.equal(run(unet, x, t, e), base)
    bank.remove()
    assert dict(unet.named_modules()) == modules
    assert all(not m._forward_hooks and not m._forward_hooks_with_kwargs for m in unet.modules())
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    assert unet.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    with bank.route(torch.tensor([0, 1]), 1.0):  # a stale bank no longer touches the UNet
        assert torch.equal(run(unet, x, t, e), base)


def test_hooks_registered_before_install_see_the_slider():
    unet = tiny_unet()
    seen = []
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    unet.get_submodule(name).register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    bank = install_sliders(unet, SliderLoraConfig(num_sliders=1))
    randomise(bank)
    x, t, e = inputs(1)
    run(unet, x, t, e)
    with bank.route(torch.tensor([0]), 1.0):
        run(unet, x, t, e)
    assert (seen[1] - seen[0]).abs().max() > 1e-3


def test_low_precision_branch_runs_in_input_dtype_with_fp32_masters():
    unet = tiny_unet()
    ref_bank = install_sliders(unet, SliderLoraConfig(num_sliders=2))
    randomise(ref_bank)
    x, t, e = inputs(2)
    with ref_bank.route(torch.tensor([0, 1]), 1.0):
        ref = run(unet, x, t, e)
    factors = [ref_bank.slider_factors(k) for k in range(2)]
    ref_bank.remove()
    unet = unet.to(torch.bfloat16)
    bank = install_sliders(unet, SliderLoraConfig(num_sliders=2))
    for k in range(2):
        bank.set_slider(k, factors[k])
    assert all(p.dtype == torch.float32 for p in bank.parameters())
    with bank.route(torch.tensor([0, 1]), 1.0):
        out = unet(x.bfloat16(), t, e.bfloat16()).sample
        out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in bank.parameters())
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


# ---- files: peft/diffusers, our loader, kohya -----------------------------------------------------
@pytest.fixture()
def trained(tmp_path):
    """A bank with rank 2 and alpha 3 (scale 1.5, so a lost alpha shows), saved slider by slider."""
    unet = tiny_unet()
    plain = copy.deepcopy(unet)
    bank = install_sliders(unet, SliderLoraConfig(num_sliders=3, rank=2, alpha=3.0))
    randomise(bank, std=0.3)
    paths = [bank.save_slider(k, tmp_path / f"slider{k}.safetensors", {"name": f"s{k}", "direction": str(k)})
             for k in range(3)]
    return unet, plain, bank, paths


def test_saved_file_layout_and_metadata(trained):
    unet, _, bank, paths = trained
    with safe_open(str(paths[1]), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        a = f.get_tensor(f"unet.{bank.module_names[0]}.lora_A.weight")
        b = f.get_tensor(f"unet.{bank.module_names[0]}.lora_B.weight")
    assert keys == {f"unet.{n}.lora_{ab}.weight" for n in bank.module_names for ab in "AB"}
    assert a.shape == (2, 32) and torch.equal(a, bank.lora_A[0][1].detach())
    # the scale alpha / r = 1.5 is folded into B, so a reader that ignores alpha gets the same slider
    torch.testing.assert_close(b, bank.lora_B[0][1].detach() * 1.5, atol=0, rtol=0)
    assert meta["name"] == "s1" and meta["direction"] == "1"
    assert '"unet.lora_alpha": 2.0' in meta["lora_adapter_metadata"]
    loaded = load_slider_file(paths[1])
    assert loaded.metadata == {"name": "s1", "direction": "1"}
    assert (loaded.factors.rank, loaded.factors.alpha) == (2, 2.0)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
@pytest.mark.parametrize("loader", ["load_lora_adapter", "load_lora_weights"])
def test_export_matches_peft_including_negative_strengths(trained, loader):
    unet, plain, bank, paths = trained
    pipe = _sd_pipe(plain)
    x, t, e = inputs(4)
    idx, s = torch.tensor([0, 1, 2, 1]), torch.tensor([1.3, -0.7, 2.0, 0.0])
    with bank.route(idx, s):
        ours = run(unet, x, t, e)
    base = run(plain, x, t, e)
    for k, path in enumerate(paths):
        if loader == "load_lora_adapter":
            plain.load_lora_adapter(str(path), adapter_name=f"s{k}", prefix="unet", use_safetensors=True)
        else:
            pipe.load_lora_weights(str(path), adapter_name=f"s{k}")
    assert plain.peft_config["s0"].lora_alpha == 2.0 and plain.peft_config["s0"].r == 2  # scale folded into B
    for n in range(4):
        plain.set_adapters([f"s{int(idx[n])}"], [float(s[n])])
        theirs = run(plain, x[n:n + 1], t[n:n + 1], e[n:n + 1])
        torch.testing.assert_close(ours[n:n + 1], theirs, atol=1e-5, rtol=0)
        assert float(s[n]) == 0 or (theirs - base[n:n + 1]).abs().max() > 1e-2
    # several sliders on every sample: dense routing = peft's weighted adapters
    plain.set_adapters(["s0", "s2"], [1.5, -1.0])
    with bank.route_dense({0: 1.5, 2: -1.0}):
        torch.testing.assert_close(run(unet, x, t, e), run(plain, x, t, e), atol=1e-5, rtol=0)
    # sliders installed on top of a UNet that carries peft adapters add to them
    both = run(plain, x, t, e)
    plain.set_adapters(["s0"], [1.5])
    on_top = install_sliders(plain, SliderLoraConfig(num_sliders=1, rank=2, alpha=3.0))
    on_top.load_slider(0, paths[2])
    with on_top.route_dense({0: -1.0}):
        torch.testing.assert_close(run(plain, x, t, e), both, atol=1e-5, rtol=0)


def test_files_of_format_1_load_with_the_same_effective_weights(trained, tmp_path):
    """Files written before the scale was folded (B unscaled, alpha 3 in the header) load as before."""
    import json

    from safetensors.torch import save_file

    unet, _, bank, _ = trained
    names = list(bank.module_names)
    state = {}
    for i, n in enumerate(names):
        state[f"unet.{n}.lora_A.weight"] = bank.lora_A[i][2].detach().clone()
        state[f"unet.{n}.lora_B.weight"] = bank.lora_B[i][2].detach().clone()
    config = {"r": 2, "lora_alpha": 3.0, "target_modules": sorted(names), "lora_dropout": 0.0, "bias": "none",
              "use_dora": False, "use_rslora": False}
    header = {"format": "pt", "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()}),
              "conceptkit_slider": json.dumps({"format": "conceptkit-slider-lora/1", "rank": 2, "alpha": 3.0,
                                               "slider_index": 2, "modules": sorted(names)}), "label": "old"}
    save_file(state, str(tmp_path / "old.safetensors"), metadata=header)
    loaded = load_slider_file(tmp_path / "old.safetensors")
    assert (loaded.factors.alpha, loaded.metadata) == (3.0, {"label": "old"})
    x, t, e = inputs(2)
    with bank.route(torch.tensor([2, 2]), torch.tensor([1.0, -0.5])):
        want = run(unet, x, t, e)
    fresh = tiny_unet()
    other = install_sliders(fresh, SliderLoraConfig(num_sliders=1, rank=2, alpha=3.0))
    other.load_slider(0, tmp_path / "old.safetensors")
    for i in range(len(names)):  # the very same factors
        assert torch.equal(other.lora_A[i][0], bank.lora_A[i][2]) and torch.equal(other.lora_B[i][0], bank.lora_B[i][2])
    with other.route(torch.tensor([0, 0]), torch.tensor([1.0, -0.5])):
        torch.testing.assert_close(run(fresh, x, t, e), want, atol=1e-6, rtol=0)


def test_load_slider_file_into_another_slot(trained, tmp_path):
    unet, _, bank, paths = trained
    x, t, e = inputs(2)
    with bank.route(torch.tensor([2, 2]), torch.tensor([1.0, -1.0])):
        want = run(unet, x, t, e)
    fresh = tiny_unet()
    other = install_sliders(fresh, SliderLoraConfig(num_sliders=2, rank=2, alpha=6.0))  # alpha folded into B
    assert other.load_slider(1, paths[2]) == {"name": "s2", "direction": "2"}
    with other.route(torch.tensor([1, 1]), torch.tensor([1.0, -1.0])):
        got = run(fresh, x, t, e)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (got - run(fresh, x, t, e)).abs().max() > 1e-2
    with pytest.raises(UsageError, match="reserved"):
        bank.save_slider(0, tmp_path / "bad.safetensors", {"format": "x"})
    torch.save({"a": torch.zeros(1)}, tmp_path / "pickle.safetensors")
    with pytest.raises(UsageError, match="safetensors"):
        load_slider_file(tmp_path / "pickle.safetensors")


def test_kohya_export_round_trips_through_diffusers(trained, tmp_path):
    unet, plain, bank, paths = trained
    kohya = export_kohya(paths[1], tmp_path / "kohya.safetensors", arch="sd1")
    with safe_open(str(kohya), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha = f.get_tensor(kohya_key(bank.module_names[0]) + ".alpha")
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
    assert len(keys) == 3 * len(bank.module_names) and float(alpha) == 2.0  # the file's folded alpha = r
    assert meta["ss_network_dim"] == "2" and meta["name"] == "s1"
    pipe = _sd_pipe(plain)
    pipe.load_lora_weights(str(kohya), adapter_name="kohya")
    x, t, e = inputs(2)
    for s in (1.7, -1.2):
        pipe.unet.set_adapters(["kohya"], [s])
        with bank.route(torch.tensor([1, 1]), s):
            torch.testing.assert_close(run(pipe.unet, x, t, e), run(unet, x, t, e), atol=1e-5, rtol=0)
    # the unfolded state dict with its alpha gives the same slider: B * 1.5 at alpha 2 = B at alpha 3
    again = export_kohya(bank.slider_state_dict(1), tmp_path / "k2.safetensors", alpha=3.0, arch="sd1")
    with safe_open(str(again), framework="pt") as f2, safe_open(str(kohya), framework="pt") as f1:
        for k in keys:
            scale = {"alpha": 1.0, "lora_down.weight": 1.0, "lora_up.weight": 1.5}[k.split(".", 1)[1]]
            alpha_ratio = 1.5 if k.endswith(".alpha") else 1.0
            torch.testing.assert_close(f1.get_tensor(k) * alpha_ratio, f2.get_tensor(k) * scale)
    with pytest.raises(UsageError, match="architecture"):
        export_kohya(paths[1], tmp_path / "k3.safetensors")  # no base_model_arch in the header, none given


def _sd_pipe(unet):
    """A real StableDiffusionPipeline around `unet`, for `load_lora_weights`."""
    from conceptkit.models.tiny import build_tiny

    pipe = build_tiny("tiny-sd")
    pipe.unet = unet
    return pipe


@pytest.mark.parametrize("name", ["tiny-sd"])
def test_kohya_names_are_the_inverse_of_diffusers(name):
    """Every linear of the SD1 UNet: diffusers reads our kohya name back to the module (SDXL's
    LDM names: tests/test_slider_clients.py)."""
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    from conceptkit.models.tiny import build_tiny

    unet = build_tiny(name).unet
    names = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(names) > 50
    for module in names:
        key = _convert_unet_lora_key(kohya_key(module) + ".lora_down.weight")
        (peft_key,) = convert_unet_state_dict_to_peft({key: None})
        assert peft_key == f"{module}.lora_A.weight"


# ---- benchmark ----------------------------------------------------------------------------------
def test_bench_batched_vs_sequential_reports_a_ratio():
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    result = bench_batched_vs_sequential(unet, 2, batch_per_slider=1, tokens=TOKENS, repeats=1)
    assert isinstance(result, BenchResult) and result.num_sliders == 2
    assert result.batched_s > 0 and result.sequential_s > 0
    assert math.isclose(result.ratio, result.sequential_s / result.batched_s)
    assert all(not m._forward_hooks_with_kwargs for m in unet.modules())
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_generation_with_guidance_matches_peft_adapters(trained):
    """A whole sampling run with classifier-free guidance: dense (K,) routing covers both halves."""
    unet, plain, bank, paths = trained
    ours, theirs = _sd_pipe(unet), _sd_pipe(plain)
    for k in (0, 2):
        theirs.load_lora_weights(str(paths[k]), adapter_name=f"s{k}")
    theirs.set_adapters(["s0", "s2"], [1.5, -1.0])

    def sample(pipe):
        return pipe("a red photo", num_inference_steps=2, guidance_scale=3.0, output_type="latent",
                    height=16, width=16, generator=torch.Generator().manual_seed(0)).images

    base = sample(ours)
    with bank.route_dense({0: 1.5, 2: -1.0}):
        got = sample(ours)
    torch.testing.assert_close(got, sample(theirs), atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-2


def test_kohya_round_trip_sdxl_including_add_embedding(tmp_path):
    """SDXL through `pipe.load_lora_weights(kohya_file)`, with targets beyond cross-attention."""
    from conceptkit.models.tiny import build_tiny

    pipe = build_tiny("tiny-sdxl")
    unet, plain = pipe.unet, copy.deepcopy(pipe.unet)
    targets = r".*(attn2\.(to_k|to_v)|ff\.net\.2|add_embedding\.linear_1)"
    bank = install_sliders(unet, SliderLoraConfig(num_sliders=2, rank=2, alpha=3.0, target_modules=targets))
    assert "add_embedding.linear_1" in bank.module_names
    randomise(bank, std=0.3)
    kohya = export_kohya(bank.save_slider(1, tmp_path / "s.safetensors"), tmp_path / "k.safetensors", arch="sdxl")
    with safe_open(str(kohya), framework="pt") as f:
        assert "lora_unet_label_emb_0_0.lora_down.weight" in f.keys()
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.alpha" in f.keys()
    pipe.unet = plain
    pipe.load_lora_weights(str(kohya), adapter_name="k")
    plain.set_adapters(["k"], [-1.3])
    g = torch.Generator().manual_seed(0)
    x, t, e = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 700]), torch.randn(2, TOKENS, 96, generator=g)
    cond = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad(), bank.route(torch.tensor([1, 1]), -1.3):
        ours = unet(x, t, e, added_cond_kwargs=cond).sample
    with torch.no_grad():
        theirs = plain(x, t, e, added_cond_kwargs=cond).sample
        plain.disable_adapters()
        base = plain(x, t, e, added_cond_kwargs=cond).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (ours - base).abs().max() > 1e-2
