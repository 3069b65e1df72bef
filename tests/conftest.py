"""Shared pytest setup: fixture path and the `gpu` marker auto-skip."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository
# Shared fixtures live beside the repo (<parent>/shared/fixtures) unless STARFLOW_FIXTURES says where.
FIXTURES = Path(os.environ.get("STARFLOW_FIXTURES", ROOT.parent / "shared" / "fixtures"))
T2I = FIXTURES / "official-t2i-tiny"
VIDEO = FIXTURES / "official-video-tiny"
VIDEO_MAX_FRAMES = 6  # the frames `video_export` covers
# words the tiny T5's SentencePiece model holds whole (one "▁word" piece each; besides <pad>, </s>, <unk>)
T5_WORDS = "a an the photo of cat dog red blue green big small house tree car on in with and sky".split()
# other words of its training text: accents, CJK, digits (their characters get pieces; others are <unk>)
T5_OTHER_WORDS = "café naïve über façade résumé 猫 犬 東京 写真 2024 42 painting portrait zebra".split()


@pytest.fixture(scope="session")
def fixture_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The official tiny T2I fixture exported once per test session, as a user would: through the
    CLI, fp32 and fp16, validation on, without the self-denoise's vjp graphs (no test of it needs
    them: the self-denoise has its own tests). Tests that modify it must work on a copy."""
    if not T2I.is_dir():
        pytest.skip(f"shared fixtures not found at {T2I}")
    from typer.testing import CliRunner

    from starflow.cli.main import app

    out = tmp_path_factory.mktemp("fixture-export") / "artifacts"
    args = [
        "export",
        "onnx",
        "--config",
        str(T2I / "config.yaml"),
        "--checkpoint",
        str(T2I / "checkpoint.pth"),
        "--no-denoise",
    ]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def video_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The official tiny video fixture with a two-class label table beside it (so prompts work),
    exported once per session by the CLI: fp32, clips of 1 .. VIDEO_MAX_FRAMES frames, without the
    density graphs. Tests that modify it must work on a copy."""
    if not VIDEO.is_dir():
        pytest.skip(f"shared fixtures not found at {VIDEO}")
    import shutil

    import torch
    from typer.testing import CliRunner

    from starflow.cli.main import app
    from starflow.model.label_encoder import LabelEncoder, labels_path, save_label_encoder

    work = tmp_path_factory.mktemp("video-export")
    checkpoint = work / "checkpoint.pth"
    shutil.copy(VIDEO / "checkpoint.pth", checkpoint)
    torch.manual_seed(0)
    save_label_encoder(LabelEncoder(["up", "down"], 5, 16), labels_path(checkpoint))
    out = work / "artifacts"
    args = ["export", "onnx", "--config", str(VIDEO / "config.yaml"), "--checkpoint", str(checkpoint)]
    args += ["--out", str(out), "--precision", "fp32", "--no-density", "--max-frames", str(VIDEO_MAX_FRAMES)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Exports made on demand (the demo model's) go to a session folder, not ~/.cache; a local run
    may keep them across sessions in STARFLOW_TEST_CACHE (CI leaves it unset)."""
    kept = os.environ.get("STARFLOW_TEST_CACHE")
    cache = Path(kept) if kept else tmp_path_factory.mktemp("starflow-cache")
    previous = os.environ.get("STARFLOW_CACHE")
    os.environ["STARFLOW_CACHE"] = str(cache)
    yield cache
    if previous is None:
        del os.environ["STARFLOW_CACHE"]
    else:
        os.environ["STARFLOW_CACHE"] = previous


@pytest.fixture(scope="session")
def demo_export(isolated_cache: Path) -> Path:
    """The embedded demo model's export, made once per session the way `starflow generate` makes it."""
    from starflow.export.cache import demo_artifacts

    return demo_artifacts()


@pytest.fixture(scope="session")
def demo_video_export(isolated_cache: Path) -> Path:
    """The embedded moving-digits model's export, made once per session like `demo_export`."""
    from starflow.export.cache import demo_artifacts

    return demo_artifacts(video=True)


def t5_tokenizer(directory: Path, **options: object):  # noqa: ANN201 (a transformers T5Tokenizer)
    """A unigram SentencePiece model trained on T5_WORDS text (the same every time; `options` are
    SentencePieceTrainer's, e.g. byte_fallback=True), written to `directory` as spiece.model, and the
    T5Tokenizer transformers converts from it (saved by the caller: tokenizer.json)."""
    import io
    import random

    import sentencepiece
    from transformers import T5Tokenizer

    rng = random.Random(0)
    text = [" ".join(rng.choices(T5_WORDS, k=rng.randint(3, 9))) for _ in range(400)]
    text += [" ".join(rng.choices(T5_WORDS + T5_OTHER_WORDS, k=rng.randint(3, 9))) for _ in range(200)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(  # T5's ids; nmt_nfkc normalisation, the default
        sentence_iterator=iter(text), model_writer=model, model_type="unigram", hard_vocab_limit=False,
        vocab_size=150 + 256 * bool(options.get("byte_fallback")), pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2, **options,
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spiece.model").write_bytes(model.getvalue())
    return T5Tokenizer.from_pretrained(directory, extra_ids=2)  # converts spiece.model


@pytest.fixture(scope="session")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random T5 encoder with a real T5-style tokenizer, saved as a T5 checkpoint ships: a
    unigram SentencePiece model (spiece.model; <pad> 0, </s> 1, <unk> 2, 2 sentinels) trained here
    in well under a second, and the tokenizer.json transformers converts from it ('$A </s>')."""
    import torch
    from transformers import T5Config, T5EncoderModel

    directory = tmp_path_factory.mktemp("encoders") / "tiny-t5"
    tokenizer = t5_tokenizer(directory)
    assert all(len(tokenizer.tokenize(word)) == 1 for word in T5_WORDS)  # the tests count on it
    torch.manual_seed(0)
    config = T5Config(
        d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64, vocab_size=len(tokenizer),
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    T5EncoderModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)  # tokenizer.json beside spiece.model
    return directory


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random AutoencoderKL (2 levels: 2x upsampling, 4 latent channels), saved as diffusers does."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=32,
    )
    directory = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(directory)
    return directory


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items or _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false)")
    for item in gpu_items:
        item.add_marker(skip)
