"""Picasso on joint attention: concept neurons on add_k_proj / add_v_proj, their maps from the image
queries' attention to the concept's text tokens, checked against the model's own attention; `cluster`
end to end on tiny-flux and tiny-sd3."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conceptkit.cli import app
from conceptkit.models.load import load_model
from conceptkit.picasso.attention import neuron_contributions
from conceptkit.picasso.joint import capture_joint, concept_layers, joint_attention_names

sys.path.insert(0, str(Path(__file__).parent))

runner = CliRunner()
FLOW = ("tiny-flux", "tiny-sd3")


def _inputs(model):
    """One transformer call's arguments for a 16x16 latent grid of the tiny models."""
    from conceptkit.diffusion_flow import flow_conditioning, pack

    g = torch.Generator().manual_seed(0)
    cond = flow_conditioning(model, ["a photo of a dog"], guidance=False)
    x = torch.randn(1, 4, 16, 16, generator=g)
    if model.arch == "flux":
        pipe = model.pipe
        ids = type(pipe)._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)
        return dict(hidden_states=pack(pipe, x), timestep=torch.tensor([0.6]), guidance=torch.tensor([3.5]),
                    pooled_projections=cond.pooled, encoder_hidden_states=cond.cond, txt_ids=cond.text_ids, img_ids=ids,
                    return_dict=False)
    return dict(hidden_states=x, timestep=torch.tensor([600.0]), encoder_hidden_states=cond.cond,
                pooled_projections=cond.pooled, return_dict=False)


@pytest.mark.parametrize("name", FLOW)
def test_neurons_are_the_text_projections_of_the_joint_blocks(name):
    net = load_model(name, device="cpu").pipe.transformer
    names, params = concept_layers(net)
    assert names == [f"transformer_blocks.{i}.attn" for i in range(2)]  # FLUX's single blocks have no text projections
    assert [p for p in params] == [m for n in names for m in (net.get_submodule(n).add_k_proj, net.get_submodule(n).add_v_proj)]
    assert joint_attention_names(net) == names


@pytest.mark.parametrize("name", FLOW)
def test_value_maps_match_the_models_own_attention_and_capture_changes_nothing(name):
    model = load_model(name, device="cpu")
    net, kw = model.pipe.transformer, _inputs(model)
    layer = "transformer_blocks.1.attn"
    attn = net.get_submodule(layer)
    seen: dict[str, torch.Tensor] = {}

    def grab(_m, args):  # the image tokens' attention output, before the output projection
        seen["out"] = args[0].detach().clone()

    handle = attn.to_out[0].register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            base = net(**kw)[0]
            with_text = seen["out"]
            zero = attn.add_v_proj.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))
            try:
                net(**kw)
            finally:
                zero.remove()
            without_text = seen["out"]
            recorded = {}
            with capture_joint(net, lambda n, a, q, k, v, p, hw: recorded.setdefault(n, (a, q, k, v, p))):
                captured = net(**kw)[0]
    finally:
        handle.remove()
    assert torch.equal(captured, base)  # the model's own attention ran untouched
    a, q, k, v, probs = recorded[layer]
    length = kw["encoder_hidden_states"].shape[1]
    assert probs.shape == (a.heads, with_text.shape[1], length) and float(probs.sum(-1).max()) < 1.0
    _, fs_v = neuron_contributions(q, k, v, probs, torch.ones(1, length), a.heads, a.scale)
    # Fs_v over every text token is exactly what the text values add to each image token's attention output
    assert torch.allclose(fs_v, with_text - without_text, atol=1e-5)


@pytest.mark.parametrize("name", FLOW)
def test_cluster_end_to_end(tmp_path, name):
    result = runner.invoke(app, ["cluster", "a photo of a dog", "-m", name, "--concept", "dog", "--samples", "4", "--steps", "8",
                                 "--temporal-dim", "2", "--k", "2", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["k"] == 2 and doc["model"] == name
    assert all("\u2581dog" in tokens for tokens in doc["concept_tokens"])  # T5's token of the concept
    assert Path(doc["images"]["centre_maps"]).is_file()
    # its sub-concepts edit images: gates of 1 change nothing, bit for bit; closing sub-concept 0 changes them
    import numpy as np
    from PIL import Image

    def draw(*extra):
        r = runner.invoke(app, ["generate", "a photo of a dog", "-m", name, "-n", "1", "--steps", "8", "--device", "cpu",
                                "--out", str(tmp_path / "img"), "--json", *extra])
        assert r.exit_code == 0, r.output
        return np.asarray(Image.open(json.loads(r.stdout)["files"][0]["path"]), dtype=np.int16)

    base = draw()
    assert np.array_equal(draw("--subconcept", f"{doc['key']}:0:scale:1"), base)
    assert np.abs(draw("--subconcept", f"{doc['key']}:0:close") - base).max() > 0
