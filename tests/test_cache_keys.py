"""Cache keys stay what they were: artifacts written by earlier versions are found again.

The expected keys were computed by conceptkit 0.1.0 before its settings declared their own key
fields (`conceptkit.settings`), from the same configurations; a change here orphans every cache.
"""

from __future__ import annotations

from conceptkit import harvest, store
from conceptkit.evaluate.cluster import ClusterEvalConfig
from conceptkit.evaluate.sliders import SliderEvalConfig
from conceptkit.models.load import load_model
from conceptkit.picasso.neurons import NeuronConfig
from conceptkit.settings import key_settings, manifest_settings
from conceptkit.sliders.pipeline import SlidersConfig, set_key


def test_harvest_keys_and_manifest_settings_are_unchanged():
    model = load_model("toy")
    cfg = harvest.HarvestConfig(prompts=("a shape", "a red shape"), samples=12, steps=10, guidance=3.0, seed=5, batch_size=3)
    assert harvest.harvest_key(model, cfg) == "2ed7658d688286a0"
    assert store.make_key(manifest_settings(cfg)) == "cdacda4fa77b69ca"


def test_slider_set_keys_and_manifest_settings_are_unchanged():
    model = load_model("toy")
    cfg = SlidersConfig("a shape", count=4, samples=8, name="myset", overwrite=True, gradient_checkpointing=True)
    assert set_key(model, cfg, "toy") == "f4d80a12e4fcf51e"
    # the manifest records `directions` and `calibration_seeds` too (added after cf87ef3; the key above is unchanged)
    assert store.make_key(manifest_settings(cfg)) == "62d52322a6e77ee0"


def test_neuron_and_evaluation_settings_keys_are_unchanged(tmp_path):
    neurons = NeuronConfig(concept="shape", samples=4, reference_images=str(tmp_path), batch_size=2, fs_size=8)
    assert store.make_key(key_settings(neurons)) == "44ace98d511e2200"
    assert store.make_key(key_settings(ClusterEvalConfig(per_subconcept=4, batch_size=7))) == "fcd7ecd98d640525"
    assert store.make_key(key_settings(SliderEvalConfig(count=8, effect_count=4, batch_size=5))) == "94f82ac0572588fb"


def test_a_transient_setting_does_not_move_a_key():
    model = load_model("toy")
    a = harvest.HarvestConfig(prompts=("a shape",), samples=4, batch_size=1)
    b = harvest.HarvestConfig(prompts=("a shape",), samples=40, batch_size=9)
    assert harvest.harvest_key(model, a) == harvest.harvest_key(model, b)
    assert harvest.harvest_key(model, a) != harvest.harvest_key(model, harvest.HarvestConfig(prompts=("a shape",), seed=1))
