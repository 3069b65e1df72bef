"""The HTTP app over the embedded digits export, in process (starlette's TestClient, no Ray, no socket)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import logging
import re
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image
from starlette.testclient import TestClient

from starflow.apps.generate import generate
from starflow.core.errors import StarflowError
from starflow.core.outputs import from_unit_images, to_uint8
from starflow.core.request import GenerateRequest, ModelSource, request
from starflow.runtime import Generator
from starflow.serving.api import LocalClient, Overloaded, create_app
from starflow.serving.types import CLIP_FORMATS, Limits, ModelInfo, Served
from starflow.serving.worker import ModelWorker

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def worker(demo_export: Path) -> ModelWorker:
    return ModelWorker("digits", Generator.load(demo_export, threads=1))


@pytest.fixture(scope="module")
def client(worker: ModelWorker) -> TestClient:
    app = create_app({"digits": LocalClient(worker)}, limits=Limits(max_body_bytes=BODY_LIMIT), api_key=KEY)
    return TestClient(app, headers=AUTH)


def png_pixels(b64: str) -> np.ndarray:
    """(H, W, 1) uint8, as the one-channel model's images are."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))[..., None]


def npy(b64: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(b64)), allow_pickle=False)


def b64_npy(array: np.ndarray) -> str:
    f = io.BytesIO()
    np.save(f, array)
    return base64.b64encode(f.getvalue()).decode()


def error(response, status: int) -> str:
    """The message of an OpenAI-shaped JSON error with this status."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"]["type"], str)
    return body["error"]["message"]


# ---- the routes -------------------------------------------------------------------------------------
def test_the_openai_package_gets_what_starflow_generate_writes(
    client: TestClient, demo_export: Path, tmp_path: Path
) -> None:
    api = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0)
    answer = api.images.generate(
        model="digits", prompt="3", n=1, size="8x12", response_format="b64_json", quality="standard",
        extra_body={"seed": 3, "guidance": 1.5},
    )  # fmt: skip
    assert answer.size == "8x12" and answer.output_format == "png" and len(answer.data) == 1
    served = png_pixels(answer.data[0].b64_json)
    assert served.shape == (12, 8, 1)  # OpenAI's size is WIDTHxHEIGHT
    job = request(prompts=["3"], seed=3, guidance=1.5, size=(12, 8), threads=1)
    written = generate(job, ModelSource(artifacts=demo_export), tmp_path / "x.npy", log=lambda _: None)
    np.testing.assert_array_equal(served, to_uint8(np.load(written.files[0]))[0])


def test_generate_returns_the_workers_images_and_costs(client: TestClient, worker: ModelWorker) -> None:
    body = {"prompts": ["1", "7"], "num_images": 2, "seed": 5, "sampler": "fast"}
    response = client.post("/v1/generate", json=body | {"output_format": "npy"})
    assert response.status_code == 200, response.text
    answer = response.json()
    (expected,) = worker.run([request(**body)])
    assert isinstance(expected, Served)
    images = np.stack([npy(item) for item in answer["images"]])
    np.testing.assert_array_equal(images, expected.images)
    assert images.dtype == np.float32 and answer["prompts"] == ["1", "1", "7", "7"]
    assert answer["iterations"] == expected.iterations and answer["block_calls"] == expected.block_calls
    assert (answer["model"], answer["seed"], answer["size"], answer["batch_images"]) == (
        "digits",
        5,
        [8, 8],
        4,
    )
    assert {"flow", "total"} <= set(answer["seconds"]) and answer["fps"] is None
    pngs = client.post("/v1/generate", json=body).json()  # png by default: the same pixels
    assert pngs["output_format"] == "png"
    np.testing.assert_array_equal(np.stack([png_pixels(p) for p in pngs["images"]]), to_uint8(images))


def test_likelihood_of_images_and_latents(client: TestClient, worker: ModelWorker) -> None:
    (served,) = worker.run([request(prompts=["2", "5"], seed=1)])
    assert isinstance(served, Served)
    expected = worker.generator.bits_per_dim(from_unit_images(served.images), ["2", "5"])
    by_images = client.post("/v1/likelihood", json={"images": b64_npy(served.images), "prompts": ["2", "5"]})
    assert by_images.status_code == 200, by_images.text
    bits = by_images.json()["bits_per_dim"]
    assert np.isfinite(bits).all() and bits == expected.tolist()
    latents = from_unit_images(served.images).tolist()  # nested lists work too
    by_latents = client.post("/v1/likelihood", json={"latents": latents, "prompts": ["2", "5"]})
    assert by_latents.json() == {"model": "digits", "bits_per_dim": bits}


NAN = b64_npy(np.full((1, 1, 8, 8), np.nan, np.float32))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompts": ["1"]}, "images, latents: give one of them"),
        ({"images": "bm90IG5weQ==", "prompts": ["1"]}, "images: expected a base64 .npy array"),
        ({"images": [[1.0], [1.0, 2.0]]}, "images: expected nested lists of numbers"),
        (
            {"latents": [[[[0.0] * 8] * 8] * 3]},
            r"latents: expected \(N, C, h, w\) .* C = 1 .* \(1, 3, 8, 8\)",
        ),
        ({"latents": NAN, "prompts": ["1"]}, "latents: holds NaN or inf"),
        ({"latents": [[[[0.0] * 8] * 8]]}, "prompts: this model reads text; give one per latent"),
    ],
)
def test_likelihood_refuses_bad_samples(client: TestClient, body: dict, message: str) -> None:
    assert re.search(message, error(client.post("/v1/likelihood", json=body), 400))


def test_models(client: TestClient, worker: ModelWorker) -> None:
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["digits"]
    card = client.get("/v1/models/digits").json()
    assert card == listed["data"][0] and card["object"] == "model"
    assert {k: card[k] for k in worker.info().model_dump()} == worker.info().model_dump(mode="json")
    assert "digits" in error(client.get("/v1/models/nope"), 404)
    assert "'nope' is not served here" in error(
        client.post("/v1/generate", json={"prompts": ["1"], "model": "nope"}), 404
    )
    assert error(client.get("/v1/nothing"), 404) == "Not Found: GET /v1/nothing"


# ---- trust: the token, the body, the fields, the limits -----------------------------------------------
def test_the_token_is_required_but_for_health_and_docs(client: TestClient) -> None:
    bare = TestClient(client.app)
    assert "missing or wrong token" in error(bare.get("/v1/models"), 401)
    assert bare.get("/v1/models").headers["WWW-Authenticate"] == "Bearer"
    assert "missing or wrong token" in error(bare.post("/v1/generate", json={"prompts": ["1"]}), 401)
    error(bare.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    error(bare.get("/v1/models", headers={"Authorization": KEY}), 401)  # no scheme
    assert bare.get("/healthz").json() == {"status": "ok", "models": ["digits"]}
    assert bare.get("/docs").status_code == 200
    schema = bare.get("/openapi.json").json()
    body = schema["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]
    assert {"prompt", "n", "size", "seed", "guidance"} <= set(body["schema"]["properties"])
    assert client.get("/v1/models").status_code == 200


def test_oversized_bodies_are_refused(client: TestClient) -> None:
    big = b'{"prompts": ["' + b"1" * BODY_LIMIT + b'"]}'
    assert "limit of 65536 bytes" in error(client.post("/v1/generate", content=big), 413)

    def chunks():  # no Content-Length: counted while read
        yield big[:1000]
        yield big[1000:]

    assert "limit of 65536 bytes" in error(client.post("/v1/generate", content=chunks()), 413)


@pytest.mark.parametrize(
    ("route", "body", "message"),
    [
        ("generate", b"{", "the request is not JSON"),
        ("generate", b'{"prompts": "1"}', "prompts: input should be a valid array, got '1'"),
        ("generate", b'{"prompts": ["1"], "seed": -1}', "seed: input should be greater than or equal to 0"),
        (
            "generate",
            b'{"prompts": ["1"], "colour": 1}',
            "colour: not a field of this request; the fields are",
        ),
        ("generate", b'{"prompts": ["1"], "threads": 2}', "threads: set by the server, not by a request"),
        ("generate", b'{"prompts": ["1"], "output_format": "gif"}', "output_format: gif is not a format for"),
        (
            "generate",
            b'{"prompts": ["1"], "num_images": 9}',
            "num_images: 9 images asked; this server allows 8",
        ),
        ("generate", b'{"prompts": ["1"], "guidance": 21}', "guidance: 21; this server allows at most 20"),
        (
            "generate",
            b'{"prompts": ["1"], "jacobi_max_iter": 100000000}',
            "jacobi_max_iter: 100000000; at most 128",
        ),
        (
            "generate",
            b'{"prompts": ["1"], "negative_prompt": "' + b"x" * 2001 + b'"}',
            "negative_prompt: a prompt of 2001",
        ),
        ("generate", b'{"prompts": ["x"]}', "this model knows the prompts"),
        (
            "generate",
            b'{"prompts": ["1"], "jacobi_stop": "batch"}',
            'jacobi_stop: "batch" couples the requests',
        ),
        ("images/generations", b'{"n": 1}', "prompt: field required"),
        ("images/generations", b'{"prompt": "1", "n": 9}', "num_images: 9 images asked"),
        ("images/generations", b'{"prompt": "1", "size": "big"}', 'size: expected "WIDTHxHEIGHT"'),
        ("images/generations", b'{"prompt": "1", "response_format": "url"}', "response_format: url is not"),
        ("images/generations", b'{"prompt": "1", "engine": "pytorch"}', "engine: set by the server"),
        ("images/generations", b'{"prompt": "1", "background": "opaque"}', "background: not a field"),
    ],
)
def test_bad_requests_are_one_json_line_naming_the_field(
    client: TestClient, route: str, body: bytes, message: str
) -> None:
    answer = client.post(f"/v1/{route}", content=body, headers={"Content-Type": "application/json"})
    assert message in error(answer, 400)


# ---- what a client of the deployment can say, and the log -------------------------------------------
@dataclasses.dataclass
class Scripted:
    """A ModelClient whose answers the test writes: a served result, an exception, or a stall."""

    local: LocalClient
    raises: BaseException | None = None
    stall_s: float = 0.0

    @property
    def info(self) -> ModelInfo:
        return self.local.info

    async def generate(self, request: GenerateRequest) -> Served:
        await asyncio.sleep(self.stall_s)
        if self.raises is not None:
            raise self.raises
        served = await self.local.generate(request)
        return dataclasses.replace(served, served_by={"node": "node-1", "replica": "digits#abc"})

    async def bits_per_dim(self, latents: np.ndarray, prompts: list[str] | None) -> list[float]:
        raise NotImplementedError


def scripted_app(worker: ModelWorker, **script) -> TestClient:
    return TestClient(create_app({"digits": Scripted(LocalClient(worker), **script)}, timeout_s=0.5))


def test_served_by_goes_to_headers(worker: ModelWorker) -> None:
    response = scripted_app(worker).post("/v1/images/generations", json={"prompt": "4"})
    assert response.status_code == 200, response.text
    assert response.headers["X-Starflow-Node"] == "node-1"
    assert response.headers["X-Starflow-Replica"] == "digits#abc"


@pytest.mark.parametrize(
    ("script", "status", "message"),
    [
        ({"raises": Overloaded("no replica free")}, 503, "no replica free"),
        ({"raises": Overloaded("queue full", status=429, retry_after_s=2.5)}, 429, "queue full"),
        ({"stall_s": 30.0}, 503, "no answer within 0.5 s"),
    ],
)
def test_overload_and_timeout_answer_at_once(
    worker: ModelWorker, script: dict, status: int, message: str
) -> None:
    response = scripted_app(worker, **script).post("/v1/generate", json={"prompts": ["1"]})
    assert message in error(response, status)
    assert int(response.headers["Retry-After"]) >= 1


def test_an_unexpected_error_is_a_logged_500_without_traceback(
    worker: ModelWorker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "starflow.serve")
    response = scripted_app(worker, raises=RuntimeError("secret detail")).post(
        "/v1/generate", json={"prompts": ["1"]}
    )
    assert error(response, 500) == "internal error; the server logged it"
    assert "secret" not in response.text
    assert any(r.exc_info and "secret detail" in str(r.exc_info[1]) for r in caplog.records)


def test_one_log_line_per_request(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "starflow.serve")
    client.post("/v1/generate", json={"prompts": ["6"], "num_images": 2})
    (line,) = [r.getMessage() for r in caplog.records if r.name == "starflow.serve"]
    assert line.startswith("POST /v1/generate 200 ")
    assert "model=digits images=2 batch_requests=1 batch_images=2" in line


def test_a_refused_request_is_a_starflow_error_from_the_local_client(worker: ModelWorker) -> None:
    with pytest.raises(StarflowError, match="frames: 3 asked of an image model"):
        asyncio.run(LocalClient(worker).generate(request(prompts=["1"], frames=3)))


# ---- clips --------------------------------------------------------------------------------------------
CLIP = {
    "prompts": ["8"],
    "frames": 3,
    "seed": 4,
    "jacobi_max_iter": 2,
}  # cheap: clips are checked, not judged


@pytest.fixture(scope="module")
def clips(demo_video_export: Path) -> tuple[TestClient, ModelWorker, Served]:
    worker = ModelWorker("digits-video", Generator.load(demo_video_export, threads=1))
    (served,) = worker.run([request(**CLIP)])
    assert isinstance(served, Served)
    return TestClient(create_app({"digits-video": LocalClient(worker)})), worker, served


def test_clips_in_every_format(clips: tuple[TestClient, ModelWorker, Served]) -> None:
    client, _, served = clips
    answers = {
        kind: client.post("/v1/generate", json=CLIP | {"output_format": kind}) for kind in CLIP_FORMATS
    }
    assert all(a.status_code == 200 for a in answers.values()), {k: a.text for k, a in answers.items()}
    (array,) = answers["npy"].json()["images"]
    np.testing.assert_array_equal(npy(array), served.images[0])
    (frames,) = answers["png"].json()["images"]
    np.testing.assert_array_equal(np.stack([png_pixels(f) for f in frames]), to_uint8(served.images[0]))
    gif = Image.open(io.BytesIO(base64.b64decode(answers["gif"].json()["images"][0])))
    assert gif.n_frames == 3 and gif.info["duration"] == 10 * round(100 / served.fps)
    assert base64.b64decode(answers["mp4"].json()["images"][0])[4:8] == b"ftyp"
    assert answers["gif"].json()["fps"] == served.fps and answers["gif"].json()["frames"] == 3
    openai_gif = client.post(
        "/v1/images/generations", json={"prompt": "8", "frames": 3, "seed": 4, "jacobi_max_iter": 2}
    )
    assert openai_gif.json()["output_format"] == "gif"
    assert openai_gif.json()["data"][0]["b64_json"] == answers["gif"].json()["images"][0]


def test_likelihood_of_clips(clips: tuple[TestClient, ModelWorker, Served]) -> None:
    client, worker, served = clips
    answer = client.post("/v1/likelihood", json={"images": b64_npy(served.images), "prompts": ["8"]})
    expected = worker.generator.bits_per_dim(from_unit_images(served.images), ["8"])
    assert answer.status_code == 200, answer.text
    assert answer.json()["bits_per_dim"] == expected.tolist()
