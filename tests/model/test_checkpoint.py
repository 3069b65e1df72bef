"""Strict checkpoint loading: official .pth, our .safetensors, and every way a file can be wrong."""

from __future__ import annotations

import argparse

import pytest
import torch

import starflow
from starflow.core.config import config_from_dict, load_config
from starflow.core.errors import StarflowError
from starflow.model.checkpoint import save_model
from tests.conftest import FIXTURES

T2I = FIXTURES / "official-t2i-tiny"
needs_fixture = pytest.mark.skipif(not T2I.is_dir(), reason=f"shared fixtures not found at {T2I}")


@needs_fixture
def test_txt_dim_is_inferred_from_proj_txt(tmp_path):
    text = (T2I / "config.yaml").read_text().replace("- txt_dim: 32\n", "")
    assert "txt_dim" not in text
    (tmp_path / "config.yaml").write_text(text)
    model = starflow.load_model(tmp_path / "config.yaml", T2I / "checkpoint.pth")
    assert model.config.txt_dim == 32
    assert not model.training


@needs_fixture
def test_safetensors_round_trip_carries_the_config(tmp_path):
    model = starflow.load_model(T2I / "config.yaml", T2I / "checkpoint.pth")
    save_model(model, tmp_path / "model.safetensors")
    again = starflow.load_model(None, tmp_path / "model.safetensors")
    assert again.config == model.config
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[key]), key
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left


def test_loading_assigns_the_checkpoint_tensors_in_the_model_dtype(tmp_path):
    """The model is built unallocated and given the checkpoint's tensors (no random init beside
    them): nothing is left on the meta device, RoPE tables are computed, a bf16 checkpoint loads
    as the fp32 model it configures, and the weights stay trainable in place."""
    from starflow.model.testing import random_model

    model = random_model(load_config("tiny-t2i"))
    save_model(model.to(torch.bfloat16), tmp_path / "bf16.safetensors")
    loaded = starflow.load_model(None, tmp_path / "bf16.safetensors")
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    for (name, expected), actual in zip(model.named_buffers(), loaded.buffers(), strict=True):
        assert torch.equal(expected, actual), name  # RoPE frequencies, fp32 under any cast
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor.float(), loaded.state_dict()[key]), key
    weight = loaded.blocks[0].proj_in.weight
    assert weight.requires_grad
    weight.data.add_(1.0)  # the file stays as it was: the tensors are private to the model
    again = starflow.load_model(None, tmp_path / "bf16.safetensors")
    assert torch.equal(again.blocks[0].proj_in.weight + 1.0, weight)


@needs_fixture
def test_truncated_and_corrupt_checkpoints(tmp_path):
    data = (T2I / "checkpoint.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(StarflowError, match="corrupt or truncated"):
        starflow.load_model(T2I / "config.yaml", tmp_path / "truncated.pth")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(StarflowError, match="corrupt or truncated safetensors"):
        starflow.load_model(None, tmp_path / "garbage.safetensors")
    with pytest.raises(StarflowError, match="no such file"):
        starflow.load_model(T2I / "config.yaml", tmp_path / "missing.pth")


@needs_fixture
def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = torch.load(T2I / "checkpoint.pth", weights_only=True)
    del state["blocks.0.proj_in.bias"]
    state["blocks.0.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "edited.pth")
    with pytest.raises(StarflowError) as err:
        starflow.load_model(T2I / "config.yaml", tmp_path / "edited.pth")
    message = str(err.value)
    assert "1 missing key(s) ['blocks.0.proj_in.bias']" in message
    assert "1 unexpected key(s) ['blocks.0.extra.weight']" in message


@needs_fixture
def test_config_checkpoint_mismatch_names_key_and_shapes(tmp_path):
    text = (T2I / "config.yaml").read_text().replace("- channels: 64", "- channels: 128")
    (tmp_path / "wide.yaml").write_text(text)
    with pytest.raises(StarflowError, match=r"key 'blocks\.0\.proj_in\.weight' has shape \(64, 4\)"):
        starflow.load_model(tmp_path / "wide.yaml", T2I / "checkpoint.pth")
    deeper = (
        (T2I / "config.yaml").read_text().replace("- layers_per_block: 1 1 2", "- layers_per_block: 1 2 2")
    )
    (tmp_path / "deeper.yaml").write_text(deeper)
    with pytest.raises(StarflowError, match="missing key"):
        starflow.load_model(tmp_path / "deeper.yaml", T2I / "checkpoint.pth")


def test_wrapped_state_dict_is_refused(tmp_path):
    model = starflow.StarFlow(config_from_dict({**starflow.PRESETS["tiny-t2i"]}))
    torch.save({"model": model.state_dict(), "step": 3}, tmp_path / "wrapped.pth")
    with pytest.raises(StarflowError, match="expected a flat module state_dict"):
        starflow.load_model("tiny-t2i", tmp_path / "wrapped.pth")


def test_pickled_objects_are_not_loaded(tmp_path):
    # an arbitrary class instance: weights_only unpickling refuses it (pickles can run code)
    torch.save({"weights": argparse.Namespace(run="code")}, tmp_path / "evil.pth")
    with pytest.raises(StarflowError, match="not a plain state_dict"):
        starflow.load_model("tiny-t2i", tmp_path / "evil.pth")


def test_safetensors_without_config_needs_one(tmp_path):
    from safetensors.torch import save_file

    model = starflow.StarFlow(load_config("tiny-t2i"))
    save_file(dict(model.state_dict()), tmp_path / "bare.safetensors")
    with pytest.raises(StarflowError, match="carries no config"):
        starflow.load_model(None, tmp_path / "bare.safetensors")
    assert starflow.load_model("tiny-t2i", tmp_path / "bare.safetensors").config.txt_dim == 32
