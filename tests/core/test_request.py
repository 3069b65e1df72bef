"""GenerateRequest: one definition of a generation request, its checks, JSON and resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from starflow.core.errors import StarflowError
from starflow.core.request import GenerateRequest, ModelSource, request, request_from_json
from starflow.core.sampler import JacobiSettings, SampleOptions


def test_round_trips_through_json() -> None:
    original = request(
        prompts=["3", ""], num_images=2, seed=7, size="16x24", frames=4, fps=12.5, negative_prompt="1",
        engine="runtime", sampler="fast", guidance=1.5, method="jacobi", jacobi_block_size=8,
        jacobi_max_iter=5, jacobi_threshold=1e-4, denoise=False, precision="fp16", backend="onnxruntime",
        threads=2, check_finite=False,
    )  # fmt: skip
    text = original.model_dump_json()
    assert request_from_json(text) == original
    assert json.loads(text)["size"] == [16, 24]


def test_json_schema_names_every_field() -> None:
    schema = GenerateRequest.model_json_schema()
    assert set(schema["properties"]) == set(GenerateRequest.model_fields)
    assert schema["required"] == ["prompts"]
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"prompts": []}, 'prompts: pass at least one ("" is the unconditional prompt)'),
        ({"num_images": 0}, "num_images: input should be greater than or equal to 1, got 0"),
        ({"num_images": True}, "num_images: input should be a valid integer, got True"),
        ({"seed": -1}, "seed: input should be greater than or equal to 0, got -1"),
        (
            {"seed": 2**64},
            "seed: input should be less than or equal to 18446744073709551615, got 18446744073709551616",
        ),
        ({"size": "0x8"}, "size: expected HxW in image pixels (for example 256x384), got '0x8'"),
        ({"aspect_ratio": "5:1"}, "aspect_ratio: '5:1' unknown; choose one of 1:1"),
        ({"size": "8x8", "aspect_ratio": "1:1"}, "give aspect_ratio or size, not both"),
        ({"fps": 8.0}, "fps: a clip option; give frames too"),
        ({"frames": 2, "fps": 0.0}, "fps: input should be greater than 0, got 0.0"),
        ({"guidance": float("nan")}, "guidance: input should be a finite number, got nan"),
        ({"method": "euler"}, "method: input should be 'jacobi' or 'sequential', got 'euler'"),
        ({"jacobi_block_size": 0}, "jacobi_block_size: input should be greater than or equal to 1, got 0"),
        ({"engine": "tvm"}, "engine: input should be 'runtime' or 'pytorch', got 'tvm'"),
        ({"threads": 0}, "threads: must be an integer >= 1 (or unset for all cores), got 0"),
        ({"engine": "pytorch", "backend": "tensorrt"}, "backend: not an option of the pytorch engine"),
        ({"artifacts": "/etc"}, "artifacts: not a request field; the fields are prompts, num_images"),
    ],
)
def test_bad_fields_are_one_line_naming_the_field(fields: dict, message: str) -> None:
    with pytest.raises(StarflowError) as caught:
        request(**{"prompts": ["3"], **fields})
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_bad_json_is_one_line() -> None:
    with pytest.raises(StarflowError, match="the request is not JSON"):
        request_from_json("{prompts")


@pytest.mark.parametrize(
    "engine, source, message",
    [
        ("runtime", ModelSource(checkpoint=Path("x.pth")), "checkpoint: not an option of the runtime engine"),
        ("pytorch", ModelSource(artifacts=Path("x")), "artifacts: not an option of the pytorch engine"),
        ("runtime", ModelSource(artifacts=Path("/nonexistent")), "artifacts /nonexistent: no such directory"),
        ("runtime", ModelSource(artifacts=Path("/")), "artifacts /: holds no manifest.json"),
        (
            "pytorch",
            ModelSource(checkpoint=Path("/nonexistent.pth")),
            "checkpoint /nonexistent.pth: no such file",
        ),
        ("pytorch", ModelSource(config="nope.yaml"), "config 'nope.yaml': no such file and not a preset"),
        ("pytorch", ModelSource(vae=Path("/nonexistent")), "vae /nonexistent: no such directory"),
    ],
)
def test_model_source_is_checked_before_loading(engine: str, source: ModelSource, message: str) -> None:
    with pytest.raises(StarflowError, match=message.replace("(", r"\(").replace(".", r"\.")):
        source.check(engine)


class FakeGenerator:
    """What `resolve` reads of a loaded engine."""

    fps, video = 10.0, True

    def sampling(self, preset: str) -> SampleOptions:
        assert preset == "official"
        return SampleOptions(guidance=2.0, jacobi=JacobiSettings(block_size=16, max_iter=32))

    def check_frames(self, frames: int | None) -> None:
        assert frames == 4

    def latent_size(self, aspect_ratio: str | None, size: tuple[int, int] | None) -> tuple[int, int]:
        return (8, 8) if size is None else size


def test_resolve_fills_what_the_request_left_unset() -> None:
    resolved = request(prompts=["1"], frames=4, jacobi_max_iter=3).resolve(FakeGenerator())
    assert resolved.sampling == SampleOptions(guidance=2.0, jacobi=JacobiSettings(block_size=16, max_iter=3))
    assert resolved.latent_size == (8, 8) and resolved.fps == 10.0
    assert request(prompts=["1"], frames=4, fps=5, guidance=0).resolve(FakeGenerator()).fps == 5
