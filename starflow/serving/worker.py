"""`ModelWorker`: one loaded export turning batches of requests into images.

A server replica and a bulk-generation actor each hold one. `run` takes whatever requests the
batcher gathered: those with the same settings share sampler calls (`ImageGenerator.
generate_many`), every request's noise comes from its own seed and the Jacobi stop test is taken
per row, so a request's images do not depend on what shared its batch. A bad request fails
alone; the others in its batch are served.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from starflow.core.errors import StarflowError
from starflow.core.generation import Job
from starflow.core.request import GenerateRequest, request
from starflow.core.sampler import SampleOptions
from starflow.core.sampling_presets import OFFICIAL
from starflow.runtime import Generator
from starflow.serving.types import ModelInfo, Served

SERVED_STOP = "row"  # the Jacobi stop rule that keeps batching invisible (see module docstring)


@dataclasses.dataclass(frozen=True)
class Settled:
    """A request's settings as this model serves them."""

    sampling: SampleOptions  # with the per-row stop test
    latent_size: tuple[int, int]
    fps: float | None  # clips


class ModelWorker:
    """An export's `Generator` behind the batch interface the server and the bulk job use."""

    def __init__(self, name: str, generator: Generator):
        self.name = name
        self.generator = generator

    @classmethod
    def load(
        cls, name: str, artifacts: Path | None = None, *, video: bool = False, threads: int | None = None
    ) -> ModelWorker:
        """The export in `artifacts`, or the embedded digits (`video`: moving-digits) model,
        exported on first use."""
        if artifacts is None:
            from starflow.export.cache import demo_artifacts

            artifacts = demo_artifacts(video=video)
        return cls(name, Generator.load(artifacts, threads=threads))

    def info(self) -> ModelInfo:
        g, manifest = self.generator, self.generator.manifest
        latent, video, text = manifest.latent, manifest.video, manifest.text
        pixels = g.factor

        def size(side: tuple[int, int]) -> tuple[int, int]:
            return side[0] * pixels, side[1] * pixels

        component = text.component if text else None
        return ModelInfo(
            name=self.name, kind="video" if video else "image", text_conditioned=g.text_conditioned,
            prompts=list(component.classes) if component and component.classes else None,
            size=size(latent.train), min_size=size(latent.min), max_size=size(latent.max),
            multiple_of=latent.multiple_of * pixels,
            frames=(video.frames.min, video.frames.max) if video else None, fps=g.fps if video else None,
            samplers=[OFFICIAL, *manifest.sampling_presets],
            default_guidance=manifest.guidance.default_weight, images_per_call=g.images_per_batch(0.0),
            channels=g.channels, pixel_space=manifest.decoder.kind == "identity",
        )  # fmt: skip

    def run(self, requests: list[GenerateRequest]) -> list[Served | StarflowError]:
        """Each request's images (or the one-line error that refused it), in order."""
        outcomes: list[Served | StarflowError | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        settled: dict[int, Settled] = {}
        for i, req in enumerate(requests):
            try:
                settled[i] = self.settle(req)
            except StarflowError as err:
                outcomes[i] = err
                continue
            key = (settled[i].sampling, settled[i].latent_size, req.frames, req.denoise)
            groups.setdefault(key, []).append(i)

        def serve(key: tuple, members: list[int]) -> None:
            sampling, latent_size, frames, denoise = key
            jobs = [Job(requests[i].prompts, requests[i].num_images, requests[i].seed,
                        requests[i].negative_prompt) for i in members]  # fmt: skip
            try:
                results = self.generator.generate_many(
                    jobs, latent_size=latent_size, sampling=sampling, denoise=denoise, frames=frames
                )
            except StarflowError as err:
                if len(members) == 1:
                    outcomes[members[0]] = err
                else:  # what the group was refused (its memory, say) may fit each request alone
                    for i in members:
                        serve(key, [i])
                return
            for i, result in zip(members, results, strict=True):
                if requests[i].check_finite and not np.isfinite(result.images).all():
                    outcomes[i] = StarflowError(
                        "the sampled images contain NaN or inf: the model overflowed on these inputs"
                    )
                    continue
                outcomes[i] = Served(
                    result.images, result.prompts, requests[i].seed, settled[i].fps, result.iterations,
                    len(members), result.batch_images, sum(b.evaluations for b in result.stats),
                    result.seconds,
                )  # fmt: skip

        for key, members in groups.items():
            serve(key, members)
        return outcomes  # type: ignore[return-value]  # every index was filled above

    def settle(self, req: GenerateRequest) -> Settled:
        """The request's sampling settings (the per-row stop test), latent size and frame rate,
        with everything this model refuses found before any work."""
        if req.jacobi_stop == "batch":
            raise StarflowError(
                'jacobi_stop: "batch" couples the requests that share a batch; a server stops each row alone'
            )
        resolved = req.resolve(self.generator)
        sampling = dataclasses.replace(resolved.sampling, stop=SERVED_STOP)
        self.generator.check(req.prompts, req.num_images, req.seed, sampling, req.denoise, req.frames)
        self.generator.check_texts([*req.prompts, req.negative_prompt or ""])
        return Settled(sampling, resolved.latent_size, resolved.fps)

    def bits_per_dim(self, latents: np.ndarray, prompts: list[str] | None) -> list[float]:
        """Each latent's exact negative log-likelihood under the flow, in bits per dimension."""
        return [float(b) for b in self.generator.bits_per_dim(latents, prompts)]

    def health(self) -> None:
        """One tiny sample through every stage (raises if the replica cannot serve)."""
        info = self.info()
        prompt = (info.prompts or [""])[0] if info.text_conditioned else ""
        frames = info.frames[0] if info.frames else None
        tiny = request(prompts=[prompt], size=info.min_size, frames=frames, jacobi_max_iter=1, guidance=0.0)
        (outcome,) = self.run([tiny])
        if isinstance(outcome, StarflowError):
            raise outcome
