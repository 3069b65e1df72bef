"""Config reading: official YAML form, our form, presets, typed validation with specific errors."""

from __future__ import annotations

import pytest

from starflow.core.config import PRESETS, StarFlowConfig, config_from_dict, load_config, save_config
from starflow.core.errors import StarflowError

OFFICIAL_3B = """\
arguments:
- no_flip: 1
- fsdp: 1
- img_size: 256
- txt_size: 128
- channel_size: 4
- patch_size: 1
- channels: 3072
- blocks: 6
- layers_per_block: 2 2 2 2 2 24
- noise_std: 0.3
- lr: 6.4e-05
- rope: 1
- adaln: 0
- sos: 1
- seq_order: L2R
- use_softplus: 1
- cond_top_only: 1
- use_final_norm: 1
- vae: stabilityai/sd-vae-ft-ema
- text: google/flan-t5-xl
- cfg: 2.5
- soft_clip: 4
other_section:
  ignored: true
"""


def test_official_yaml_form(tmp_path):
    path = tmp_path / "official.yaml"
    path.write_text(OFFICIAL_3B)
    config = load_config(path)
    assert config.layers_per_block == [2, 2, 2, 2, 2, 24]
    assert config.num_blocks == 6 and config.block_layers[-1] == 24
    assert config.rope is True and config.sos is True and config.soft_clip == 4.0
    assert config.latent_size == 32  # img_size is in pixels when a VAE is named (SD-VAE: /8)
    assert config.txt_dim == 0  # official YAMLs omit it; the checkpoint supplies it
    assert config.extra["lr"] == 6.4e-05 and config.extra["no_flip"] == 1  # unknown keys kept
    assert "other_section" not in config.extra and "ignored" not in config.extra
    # same architecture as the preset, apart from txt_dim (known for flan-t5-xl)
    preset = load_config("starflow-3b-t2i")
    assert preset.block_layers == config.block_layers and preset.latent_size == 32


def test_our_form_round_trips(tmp_path):
    config = load_config("tiny-t2i")
    config.extra["note"] = "kept"
    save_config(config, tmp_path / "ours.yaml")
    again = load_config(tmp_path / "ours.yaml")
    assert again == config


def test_block_permutations_follow_seq_order():
    flips = config_from_dict({**PRESETS["starflow-3b-t2i"]}).block_flips()
    # reference: flip, id, flip, id, flip for blocks 0-4 and identity for the deep block
    assert flips == [True, False, True, False, True, False]
    r2l = config_from_dict({**PRESETS["starflow-3b-t2i"], "seq_order": "R2L"}).block_flips()
    assert r2l == [False, True, False, True, False, True]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("norm_type", "batch_norm", "allowed values are ['layer_norm', 'rms_norm']"),
        ("seq_order", "T2B", "allowed values are ['L2R', 'R2L']"),
        ("channels", "wide", "expected int"),
        ("rope", "maybe", "expected bool"),
        ("layers_per_block", "2 x 2", "expected list"),
        ("num_kv_heads", 3, "num_heads=4 must be a positive multiple of num_kv_heads=3"),
        ("patch_size", 3, "not divisible by patch_size 3"),
        ("use_pretrained_lm", "gemma", "not supported (pretrained-LM deep blocks)"),
    ],
)
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(StarflowError, match=f"config key '{key}'") as err:
        config_from_dict({**PRESETS["tiny-t2i"], key: value})
    assert message in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(StarflowError, match="no such file and not a preset"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("arguments:\n- channels: [unclosed\n")
    with pytest.raises(StarflowError, match="not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("something: else\n")
    with pytest.raises(StarflowError, match="expected an official 'arguments:' list"):
        load_config(wrong)


def test_defaults_are_the_official_ones():
    config = StarFlowConfig()
    assert (config.channel_size, config.patch_size, config.channels, config.head_dim) == (3, 4, 512, 64)
    assert config.seq_order == "R2L" and config.norm_type == "layer_norm" and config.use_bias
