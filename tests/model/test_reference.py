"""Text to image end to end: tiny random T5 + latent flow + tiny AutoencoderKL, export vs PyTorch.

The acceptance check of the components: the same prompts and seed through `starflow export onnx`
+ the runtime `Generator` and through the PyTorch pipeline (`starflow.model.reference.ReferenceGenerator`)
give the same images within 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from starflow.contract.manifest import Manifest  # noqa: E402
from starflow.core.config import StarFlowConfig, load_config  # noqa: E402
from starflow.core.errors import StarflowError  # noqa: E402
from starflow.core.sampler import SampleOptions  # noqa: E402
from starflow.export.onnx import ExportOptions, export_onnx  # noqa: E402
from starflow.model.checkpoint import save_model  # noqa: E402
from starflow.model.reference import ReferenceGenerator  # noqa: E402
from starflow.model.testing import random_model  # noqa: E402
from starflow.runtime.generator import Generator  # noqa: E402
from tests.conftest import T5_WORDS  # noqa: E402

TXT_SIZE = 8
LONG = " ".join(T5_WORDS)  # 20 words: truncated to 8 tokens


@pytest.fixture(scope="module")
def latent_model(tmp_path_factory: pytest.TempPathFactory):
    """A latent (SD-VAE) text-conditioned flow whose text width is the tiny T5's (32)."""
    base = load_config("tiny-t2i").to_dict()
    config = StarFlowConfig(  # fmt: skip
        **{
            **base,
            "img_size": 64,
            "layers_per_block": [1, 1],
            "txt_size": TXT_SIZE,
            "vae": "tiny-sd-vae",
            "text": "tiny-t5",
            "cfg": 1.5,
        }
    )
    model = random_model(config, seed=3)
    path = tmp_path_factory.mktemp("latent-flow") / "model.safetensors"
    save_model(model, path)
    return model, path


@pytest.fixture(scope="module")
def t2i_export(latent_model, t5_dir: Path, vae_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, checkpoint = latent_model
    out = tmp_path_factory.mktemp("t2i-export") / "artifacts"
    export_onnx(checkpoint, out, ExportOptions(precisions=("fp32",), text_encoder=t5_dir, vae=vae_dir))
    return out


def test_manifest_names_every_component(t2i_export: Path) -> None:
    manifest = Manifest.load(t2i_export)
    component = manifest.text.component
    assert component.kind == "hf-encoder" and component.token_length == TXT_SIZE
    assert (t2i_export / component.tokenizer).is_file()
    assert [f.file for f in manifest.files] == [component.tokenizer, component.sentencepiece]
    assert manifest.decoder.kind == "sd-vae" and manifest.decoder.scale == 0.18215
    assert manifest.denoise.kind == "nll-gradient" and manifest.denoise.graph is None
    assert {g.kind for g in manifest.graphs if g.block is None} == {"text_encoder", "decoder"}
    assert all({"forward", "vjp"} <= set(block.graphs["fp32"]) for block in manifest.blocks)


@pytest.mark.parametrize("aspect_ratio", [None, "16:9"])
def test_runtime_equals_pytorch_end_to_end(latent_model, t2i_export, t5_dir, vae_dir, aspect_ratio) -> None:
    model, checkpoint = latent_model
    generator = Generator.load(t2i_export)
    reference = ReferenceGenerator.load(checkpoint, text_encoder=t5_dir, vae=vae_dir)
    reference.batch_size = generator.images_per_batch(1.5)
    latent_size = generator.latent_size(aspect_ratio)
    assert reference.latent_size(aspect_ratio) == latent_size
    settings = dict(num_images=1, seed=11, negative_prompt="blue sky", sampling=SampleOptions(guidance=1.5))
    prompts = ["a red cat", "the small dog on a tree"]
    deployed = generator.generate(prompts, latent_size=latent_size, **settings)
    expected = reference.generate(prompts, latent_size=latent_size, **settings).images
    f = generator.factor
    assert deployed.images.shape == expected.shape == (2, latent_size[0] * f, latent_size[1] * f, 3)
    assert np.abs(deployed.images - expected).max() < 1e-4
    assert deployed.images.std() > 0.01  # not a constant image


def test_long_prompt_is_truncated_with_a_warning(t2i_export: Path) -> None:
    generator = Generator.load(t2i_export)
    with pytest.warns(UserWarning, match="it was truncated"):
        generator.generate([LONG], sampling=SampleOptions(guidance=0.0), denoise=False)


def test_export_without_a_vae_cannot_decode(latent_model, t5_dir: Path, tmp_path: Path) -> None:
    _, checkpoint = latent_model
    out = tmp_path / "a"
    export_onnx(checkpoint, out, ExportOptions(precisions=("fp32",), text_encoder=t5_dir, denoise=False))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["decoder"]["graph"] is None and manifest["denoise"] is None
    generator = Generator.load(out)
    with pytest.raises(StarflowError, match="no decoder; re-export with vae=DIR"):
        generator.generate(["a cat"], denoise=False)
    with pytest.raises(StarflowError, match="no self-denoise step"):
        generator.generate(["a cat"])


def test_text_encoder_of_the_wrong_width_is_refused(t5_dir: Path, tmp_path: Path) -> None:
    config = StarFlowConfig(**{**load_config("tiny-t2i").to_dict(), "txt_dim": 48})
    save_model(random_model(config), tmp_path / "m.safetensors")
    with pytest.raises(StarflowError, match="hidden size 32"):
        export_onnx(
            tmp_path / "m.safetensors",
            tmp_path / "out",
            ExportOptions(precisions=("fp32",), text_encoder=t5_dir),
        )
    assert not (tmp_path / "out").exists()
