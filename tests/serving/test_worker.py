"""The serving worker: a request's images do not depend on what shares its batch (per-job noise,
per-row Jacobi stop), a bad request fails alone, and the likelihood equals the PyTorch model's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from starflow.core.errors import StarflowError
from starflow.core.generation import Job
from starflow.core.outputs import from_unit_images
from starflow.core.request import GenerateRequest, request
from starflow.runtime import Generator
from starflow.serving.types import Served
from starflow.serving.worker import ModelWorker


@pytest.fixture(scope="module")
def image_worker(demo_export: Path) -> ModelWorker:
    return ModelWorker("digits", Generator.load(demo_export, threads=1))


@pytest.fixture(scope="module")
def video_worker(demo_video_export: Path) -> ModelWorker:
    return ModelWorker("digits-video", Generator.load(demo_video_export, threads=1))


def mixed(target: GenerateRequest, frames: int | None) -> list[GenerateRequest]:
    """Eight requests around `target`: other prompts, seeds, guidance weights and image counts."""
    others = [
        request(
            prompts=[str(d)],
            seed=100 + d,
            num_images=1 + d % 2,
            guidance=[None, 0.0, 3.0][d % 3],  # None: the target's (the model's), so some share its call
            frames=frames,
        )
        for d in range(7)
    ]
    return [*others[:3], target, *others[3:]]


@pytest.mark.parametrize("kind", ["image", "video"])
def test_a_request_is_the_same_alone_or_in_a_mixed_batch(kind, image_worker, video_worker):
    worker, frames = (image_worker, None) if kind == "image" else (video_worker, 3)
    target = request(prompts=["7"], seed=11, num_images=2, frames=frames)
    (alone,) = worker.run([target])
    outcomes = worker.run(mixed(target, frames))
    assert all(isinstance(o, Served) for o in outcomes), outcomes
    batched = outcomes[3]
    assert batched.batch_requests > 1  # it did share a sampler call
    assert np.abs(batched.images - alone.images).max() <= 1e-5
    assert batched.iterations == alone.iterations
    # the official whole-batch stop test would not give this: the call it shared, coupled
    g = worker.generator
    resolved = target.resolve(g)
    coupled = dataclasses.replace(resolved.sampling, stop="batch")
    group = [r for r in mixed(target, frames) if r.guidance is None]  # the target's settings
    assert len(group) == batched.batch_requests > 1
    jobs = [Job(r.prompts, r.num_images, r.seed) for r in group]
    shared = g.generate_many(jobs, sampling=coupled, latent_size=resolved.latent_size, frames=frames)
    assert np.abs(shared[group.index(target)].images - alone.images).max() > 1e-3


def test_a_bad_request_fails_alone(image_worker):
    good = request(prompts=["3"], seed=1)
    unknown_prompt = request(prompts=["a cat"])
    too_big = request(prompts=["3"], size=(512, 512))
    outcomes = image_worker.run([good, unknown_prompt, too_big, request(prompts=["3"], jacobi_stop="batch")])
    assert isinstance(outcomes[0], Served) and outcomes[0].images.shape[0] == 1
    assert "this model knows the prompts" in str(outcomes[1])
    assert "outside this export's range" in str(outcomes[2])
    assert str(outcomes[3]).startswith('jacobi_stop: "batch" couples')
    assert all(isinstance(o, StarflowError) for o in outcomes[1:])


def test_likelihood_equals_the_pytorch_model(image_worker):
    torch = pytest.importorskip("torch")
    from starflow.model.reference import ReferenceGenerator

    (served,) = image_worker.run([request(prompts=["2", "5"], seed=4)])
    latents = from_unit_images(served.images)
    ours = image_worker.bits_per_dim(latents, served.prompts)
    reference = ReferenceGenerator.load(None)
    y = reference.encode(served.prompts)
    for i, bits in enumerate(ours):
        expected = reference.model.nll(torch.from_numpy(latents[i : i + 1]), y[i : i + 1]).bits_per_dim.item()
        assert abs(bits - expected) < 1e-4
    with pytest.raises(
        StarflowError, match=r"prompts: this model reads text; give one per latent \(2\), got 1"
    ):
        image_worker.bits_per_dim(latents, ["2"])


def test_info_and_health(image_worker, video_worker):
    image, video = image_worker.info(), video_worker.info()
    assert (image.kind, image.frames, image.fps) == ("image", None, None)
    assert image.prompts == [str(d) for d in range(10)] and "official" in image.samplers
    assert video.kind == "video" and video.frames[0] >= 1 and video.fps > 0
    image_worker.health()
    video_worker.health()
