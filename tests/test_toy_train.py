"""Toy training recipe pieces: contrast groups for the CLIP and the UNet's warm start."""

from __future__ import annotations

import numpy as np
import torch

from conceptkit.toy import FACTORS, analyse_batch
from conceptkit.toy.train_clip import contrast_groups
from conceptkit.toy.world import render, sample_scenes


def test_contrast_groups_differ_in_one_named_factor_only():
    scenes = sample_scenes(50, seed=3)
    out, mentions = contrast_groups(scenes, np.random.default_rng(0), 14, ("shape", "size"), p_mention=0.3)
    assert len(out) == 14 and mentions.shape == (14, len(FACTORS))
    names = list(FACTORS)
    groups = [(out[0:4], mentions[0:4], "shape"), (out[4:7], mentions[4:7], "size"),
              (out[7:11], mentions[7:11], "shape"), (out[11:14], mentions[11:14], "size")]
    for members, rows, factor in groups:
        values = [m.factors[factor] for m in members]
        assert sorted(values) == sorted(FACTORS[factor])  # every value of the factor once
        for other in names:
            if other != factor:
                assert len({m.factors[other] for m in members}) == 1, (factor, other)
        assert rows[:, names.index(factor)].all()  # the caption always names it
    # the rendered images really show the change: the analyser reads each group's factor back
    readings = analyse_batch(render(out))
    assert all(r.valid and r.factors == s.factors for r, s in zip(readings, out))


def test_unet_warm_start_takes_the_other_runs_weights(tmp_path):
    from conceptkit.toy.checkpoint import load_latest, unprefixed
    from conceptkit.toy.model import ToyArchitecture, build_clip, build_tokenizer, build_vae
    from conceptkit.toy.train import export_clip
    from conceptkit.toy.train_unet import UnetTrainConfig, train_unet

    torch.manual_seed(0)
    arch = ToyArchitecture()
    tok = build_tokenizer()
    clip = build_clip(arch, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id).eval()
    export_clip(clip, tok, tmp_path / "export" / "clip")
    export_clip(clip, tok, tmp_path / "export" / "clip-contrast")
    vae = build_vae(arch)
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "export" / "vae")
    cfg = dict(batch=4, pool=64, checkpoint_every_s=1e9)
    first = train_unet(UnetTrainConfig(steps=3, **cfg), arch, tmp_path, tmp_path / "w1", log=lambda m: None)
    logs = []
    warm = train_unet(UnetTrainConfig(steps=1, lr=1e-12, **cfg), arch, tmp_path, tmp_path / "w2", log=logs.append,
                      clip_name="clip-contrast", stage_dir="unet-contrast", init_from="unet")
    assert any("warm start from unet step 3" in m for m in logs)
    ema = unprefixed("ema", load_latest(tmp_path / "unet").tensors)
    for name, p in warm.state_dict().items():  # one step at a vanishing rate: still the first run's EMA
        assert torch.allclose(p, ema[name], atol=1e-4), name
    assert load_latest(tmp_path / "unet-contrast").state["step"] == 1
    assert first is not None
    # a coupled line builds its factor subspaces from the pool once and ships them with the export
    train_unet(UnetTrainConfig(steps=1, coupled=True, **cfg), arch, tmp_path, tmp_path / "w3", log=lambda m: None,
               stage_dir="unet-coupled", init_from="unet")
    from conceptkit.toy import coupling

    shipped = coupling.load_coupling(tmp_path / "w3" / coupling.FILE)
    assert shipped.read(torch.zeros(1, 4, 8, 8)) and (tmp_path / "unet-coupled" / coupling.FILE).exists()
    assert '"coupled_noise": true' in (tmp_path / "w3" / "training.json").read_text()
    # resuming that line without coupling is refused, not silently continued with plain noise
    import pytest

    with pytest.raises(ValueError, match="noise coupling"):
        train_unet(UnetTrainConfig(steps=2, **cfg), arch, tmp_path, tmp_path / "w4", log=lambda m: None, stage_dir="unet-coupled")
