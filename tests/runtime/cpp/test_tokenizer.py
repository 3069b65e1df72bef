"""libstarflow's prompts for T5-family exports (runtime/cpp/src/tokenizer.cpp, the SentencePiece
library over the export's spiece.model) against the Python runtime's (tokenizer.json through the
`tokenizers` library): the same ids and masks for a corpus of over 1,000 strings, the same images
end to end, and a status for what it cannot tokenise."""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

from starflow.contract.manifest import MANIFEST_NAME, Manifest, sha256
from starflow.core.config import config_from_dict
from starflow.core.errors import StarflowError
from starflow.core.generation import make_noise
from starflow.export.onnx import ExportOptions, export_onnx
from starflow.model.checkpoint import save_model
from starflow.model.testing import random_model
from starflow.runtime import Generator
from tests.conftest import T5_OTHER_WORDS, T5_WORDS, t5_tokenizer
from tests.runtime.cpp.test_libstarflow import ASAN_BUILD, BUILD, _set_digest, built, run

TOKEN_LENGTH = 24  # the flow's txt_size: the text encoder's token_length
# a small text-conditioned flow whose text width is the tiny T5's (32)
T5_FLOW = dict(
    channel_size=2, img_size=8, patch_size=2, channels=32, layers_per_block=[1, 1], head_dim=16,
    num_heads=2, rope=True, sos=True, txt_size=TOKEN_LENGTH, txt_dim=32, cond_top_only=False,
)  # fmt: skip
UNK, EOS = 2, 1  # T5's ids (the fixture's too)


@pytest.fixture(scope="module")
def t5_export(t5_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("cpp-t5")
    save_model(random_model(config_from_dict(T5_FLOW), seed=4), work / "model.safetensors")
    options = ExportOptions(
        precisions=("fp32",), validate=False, denoise=False, density=False, text_encoder=t5_dir
    )
    export_onnx(work / "model.safetensors", work / "artifacts", options)
    return work / "artifacts"


def corpus() -> list[str]:
    """Over 1,000 strings: every class below alone, then random mixtures of them."""
    rng = random.Random(27)
    known = T5_WORDS + T5_OTHER_WORDS
    accents = "é e\u0301 É ñ n\u0303 ü ç ø ß Å ﬁ ǅ Ａｂｃ ² Ⅻ µ Ω".split()  # composed, combining, NFKC
    cjk = "猫 東京 写真 犬 中文 日本語 ひらがな カタカナ ｶﾀｶﾅ 한국어 \u1100\u1161 。 、".split()
    emoji = "🙂 🦓 👍🏽 ❤️ 👩\u200d👩\u200d👧 🇫🇷 🙂🙂 🏳️\u200d🌈 ✨".split()
    spaces = [" ", "  ", "\t", "\n", "\r\n", "   \t ", "\x0b", "\x0c"]
    spaces += list("\u00a0\u3000\u2002\u2009\u200b\u2028\u2029\u0085\u1680\ufeff\u180e")  # Unicode's
    punctuation = ". , !? ... … “quoted” ‘single’ ' \" (a) [b] {c} – — - _ @#$%^&* \\ / | ~` ;: < > <> «» ¿ ¡"
    punctuation = punctuation.split()
    digits = "0 42 3.14 1,000,000 2024-01-02 १२३ ٣ ½ 10% $5 1e-4 007".split()
    specials = "</s> <pad> <unk> <extra_id_0> <extra_id_1> <extra_id_2>".split()  # T5's added tokens
    specials += "<s> </S> </s s> <</s>> </s></s> <extra_id_0><extra_id_1> <extra_id_01>".split() + ["</ s>"]
    odd = ["\u2581", "a\u2581b", "\u2581\u2581a", "a\u2581", "\x01", "\x7f", "\x1b[0m", "\u200d", "\ufffd"]
    odd += ["\U0001d400", "\U0010ffff", "\ue000", "Ⓐ", "㍿"]  # (lone combining marks: GRAPHEMES)
    pieces = known + accents + cjk + emoji + spaces + punctuation + digits + specials + odd
    strings = ["", " ", "\t\n", *pieces]
    strings += [f"{p} a red cat" for p in pieces] + [f"a red cat{p}" for p in pieces]
    strings += [f"{s}a{s}cat{s}" for s in spaces]
    strings += [" ".join(rng.choices(T5_WORDS, k=n)) for n in range(15, 40)]  # over-length: truncated
    strings += ["a" * 200, "cat " * 100, "🦓" * 50, "</s>" * 30, " " * 100 + "cat"]
    for _ in range(800):
        parts = rng.choices(pieces, k=rng.randint(1, 12))
        glue = rng.choice(["", " ", " ", "  ", "\t"])
        strings.append(glue.join(parts))
    return strings


# The one class of strings whose ids differ: tokenizers' Precompiled normalizer maps whole grapheme
# clusters, SentencePiece's the longest match at each position. A cluster under 6 bytes that the map
# does not hold whole is replaced by its first mapped prefix's mapping (tokenizers drops the rest: "ﬁ"
# + U+0301 gives "fi"); a longer one is mapped character by character (a letter with 3 decomposed
# marks is not composed). A mark glued to a character the map changes, or 6+ bytes of decomposed
# marks, is rare in a prompt; matching it would take a hand-written normalizer (graphemes included).
GRAPHEMES = ["a\u0300\u0301\u0302", "ﬁ\u0301", "\u1680\u0301", "²\u0301"]


def cpp_tokenize(build: Path, export: Path, prompts: list[str], work: Path) -> tuple[np.ndarray, np.ndarray]:
    """starflow-run --tokenize: the whole list in one process (sf_pipeline_tokenize)."""
    args = ["--artifacts", export, "--tokenize", "--out", work / "ids.npy", "--mask-out", work / "mask.npy"]
    for prompt in prompts:
        args += ["--prompt", prompt]
    result = run(built(build) / "starflow-run", *args)
    assert result.returncode == 0, result.stderr
    assert "Sanitizer" not in result.stderr and "runtime error" not in result.stderr
    return np.load(work / "ids.npy"), np.load(work / "mask.npy")


def python_tokenize(export: Path, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one truncation warning per long prompt
        return Generator.load(export, threads=1).text.tokenize(prompts)


@pytest.mark.parametrize("build", [BUILD, ASAN_BUILD], ids=["release", "asan-ubsan"])
def test_corpus_gets_the_python_runtimes_ids_and_masks(t5_export, tmp_path, build):
    prompts = corpus()
    assert len(prompts) >= 1000
    ids, mask = cpp_tokenize(build, t5_export, prompts, tmp_path)
    want_ids, want_mask = python_tokenize(t5_export, prompts)
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape == (len(prompts), TOKEN_LENGTH)
    differ = [
        i for i in range(len(prompts)) if (ids[i] != want_ids[i]).any() or (mask[i] != want_mask[i]).any()
    ]
    shown = [(prompts[i], ids[i].tolist(), want_ids[i].tolist()) for i in differ[:5]]
    assert not differ, f"{len(differ)} of {len(prompts)} strings differ (prompt, C++, Python): {shown}"
    # the corpus reaches what it is meant to: truncation (keeping </s>), <unk>, added tokens in the text
    lengths = want_mask.sum(axis=1)
    assert (lengths == TOKEN_LENGTH).sum() > 50 and (ids[lengths == TOKEN_LENGTH, -1] == EOS).all()
    assert (ids == UNK).any(axis=1).sum() > 100
    assert ((ids[:, :-1] == EOS) & (mask[:, 1:] == 1)).any(axis=1).sum() > 20  # "</s>" in the text
    assert ids[0].tolist() == [EOS] + [0] * (TOKEN_LENGTH - 1)  # "": just </s>, then padding


def test_grapheme_clusters_are_the_one_known_difference(t5_export, tmp_path):
    """GRAPHEMES differ, each (measured here, so that what the docs claim stays true)."""
    ids, _ = cpp_tokenize(BUILD, t5_export, GRAPHEMES, tmp_path)
    want_ids, _ = python_tokenize(t5_export, GRAPHEMES)
    assert (ids != want_ids).any(axis=1).all()


def test_prompt_mode_equals_the_python_generator(t5_export, tmp_path):
    """prompt -> SentencePiece ids -> T5 graph -> flow (guidance) -> image, in C++ and in Python."""
    generator = Generator.load(t5_export, threads=1)
    prompts = ["a red cat", "猫 on the big house </s> with 🦓", ""]
    sampling = dataclasses.replace(generator.default_sampling(), guidance=1.5)
    settings = dict(negative_prompt="blue sky", seed=3, sampling=sampling, denoise=False)
    generation = generator.generate(prompts, **settings)
    np.save(tmp_path / "noise.npy", make_noise(3, (3, 2, *generator.latent_size())))
    args = ["--artifacts", t5_export, "--noise", tmp_path / "noise.npy", "--threads", "1", "--no-denoise"]
    args += ["--guidance", "1.5", "--negative-prompt", "blue sky", "--latents-out", tmp_path / "latents.npy"]
    for prompt in prompts:
        args += ["--prompt", prompt]
    result = run(built(BUILD) / "starflow-run", *args, "--out", tmp_path / "images.npy")
    assert result.returncode == 0, result.stderr
    assert np.abs(np.load(tmp_path / "latents.npy") - generation.latents).max() <= 1e-4
    assert np.abs(np.load(tmp_path / "images.npy") - generation.images).max() <= 1e-4
    assert generation.images.std() > 0.01


def _edited(export: Path, directory: Path, edit_manifest=None, edit_files=None) -> Path:
    """A copy of `export` with its files and manifest changed, sha256s and digest made to match."""
    shutil.copytree(export, directory)
    if edit_files:
        edit_files(directory)
    data = json.loads((directory / MANIFEST_NAME).read_text())
    if edit_manifest:
        edit_manifest(data)
    for entry in data["files"]:
        entry["sha256"] = sha256(directory / entry["file"])
        entry["bytes"] = (directory / entry["file"]).stat().st_size
    _set_digest(directory, data)
    return directory


def _unlist_the_model(data: dict) -> None:
    data["files"] = [f for f in data["files"] if f["file"] != "spiece.model"]


def _no_sentencepiece(data: dict) -> None:
    _unlist_the_model(data)
    data["text"]["component"]["sentencepiece"] = None


def _garbage_model(directory: Path) -> None:
    (directory / "spiece.model").write_bytes(b"\x01" * 64)


def _edit_tokenizer_json(edit):  # noqa: ANN001, ANN202
    def write(directory: Path) -> None:
        tokenizer = json.loads((directory / "tokenizer.json").read_text())
        edit(tokenizer)
        (directory / "tokenizer.json").write_text(json.dumps(tokenizer))

    return write


def _other_charsmap(tokenizer: dict) -> str:
    """The Precompiled map with one byte of its normalised strings changed."""
    data = bytearray(base64.b64decode(tokenizer["normalizer"]["precompiled_charsmap"]))
    data[-2] ^= 1
    return base64.b64encode(bytes(data)).decode()


CANNOT = {  # name: (manifest edit, files edit, what the status says)
    "no-model": (_no_sentencepiece, None, "carries no SentencePiece model for its tokenizer"),
    "garbage-model": (None, _garbage_model, "spiece.model: not a SentencePiece model"),
    "other-vocabulary": (
        None,
        _edit_tokenizer_json(lambda t: t["model"]["vocab"][5].__setitem__(0, "\u2581zzz")),
        "tokenizer.json: id 5 is",
    ),
    "other-template": (
        None,
        _edit_tokenizer_json(lambda t: t.update(post_processor={"type": "BertProcessing"})),
        'its post_processor is "BertProcessing"',
    ),
    "other-pre-tokenizer": (
        None,
        _edit_tokenizer_json(lambda t: t.update(pre_tokenizer=t["pre_tokenizer"]["pretokenizers"][1])),
        "its pre_tokenizer is",
    ),
    "unlisted-model": (_unlist_the_model, None, "names 'spiece.model', which files does not list"),
    "other-charsmap": (
        None,
        _edit_tokenizer_json(lambda t: t["normalizer"].update(precompiled_charsmap=_other_charsmap(t))),
        "its Precompiled character map is not the one in",
    ),
    "other-unk-id": (
        None,
        _edit_tokenizer_json(lambda t: t["model"].update(unk_id=0)),
        f"its unk_id is 0, {UNK} in",
    ),
    "template-without-prompt": (
        None,
        _edit_tokenizer_json(lambda t: t["post_processor"].update(single=t["post_processor"]["single"][1:])),
        "its template has no place for the prompt ($A)",
    ),
    "pad-id-outside": (
        lambda d: d["text"]["component"].update(pad_id=100000),
        None,
        "text.component.pad_id 100000 is not an id of its vocabulary",
    ),
}


@pytest.mark.parametrize("name", CANNOT)
def test_what_cannot_be_tokenised_gets_a_status(t5_export, tmp_path, name):
    edit_manifest, edit_files, phrase = CANNOT[name]
    directory = _edited(t5_export, tmp_path / name, edit_manifest, edit_files)
    args = ["--artifacts", directory, "--tokenize", "--prompt", "a cat", "--out", tmp_path / "ids.npy"]
    result = run(built(BUILD) / "starflow-run", *args)
    assert result.returncode == 1 and phrase in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "ids.npy").exists()


def test_a_prompt_that_is_not_utf8_gets_a_status(t5_export, tmp_path):
    program = built(BUILD) / "starflow-run"
    args = [program, "--artifacts", t5_export, "--tokenize", "--out", tmp_path / "ids.npy"]
    args = [*map(str, args), "--prompt", "a cat", "--prompt", b"a \xff cat"]
    result = subprocess.run(args, capture_output=True, timeout=600)
    assert result.returncode == 1 and b"prompt 1: not valid UTF-8" in result.stderr, result.stderr


def test_a_refused_tokenizer_still_takes_token_ids(t5_export, tmp_path):
    """A tokenizer.json libstarflow cannot follow refuses prompts only: the export loads, and token
    ids (the way the refusal points to) sample as from the unedited export."""
    refused = _edited(t5_export, tmp_path / "refused", None, CANNOT["other-template"][1])
    ids, mask = python_tokenize(t5_export, ["a red cat"])
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "mask.npy", mask)
    noise = make_noise(3, (1, 2, 8, 8))
    np.save(tmp_path / "noise.npy", noise)
    images = []
    for export in (t5_export, refused):
        args = ["--artifacts", export, "--noise", tmp_path / "noise.npy", "--threads", "1", "--no-denoise"]
        args += ["--guidance", "0", "--token-ids", tmp_path / "ids.npy"]
        args += ["--attention-mask", tmp_path / "mask.npy"]
        result = run(built(BUILD) / "starflow-run", *args, "--out", tmp_path / "out.npy")
        assert result.returncode == 0, result.stderr
        images.append(np.load(tmp_path / "out.npy"))
    assert np.array_equal(images[0], images[1]) and images[0].std() > 0.01
    args = ["--artifacts", refused, "--noise", tmp_path / "noise.npy", "--no-denoise"]
    args += ["--prompt", "a red cat"]
    result = run(built(BUILD) / "starflow-run", *args, "--out", tmp_path / "prompt.npy")
    assert result.returncode == 1 and 'its post_processor is "BertProcessing"' in result.stderr, result.stderr


def _variant(export: Path, directory: Path, **options: object) -> Path:
    """`export` with its tokenizer trained again with SentencePieceTrainer `options` (spiece.model and
    the tokenizer.json transformers converts from it); the tests only tokenise (no graph runs)."""

    def replace(copy: Path) -> None:
        t5_tokenizer(directory / "tokenizer", **options).save_pretrained(directory / "tokenizer")
        for name in ("spiece.model", "tokenizer.json"):
            shutil.copyfile(directory / "tokenizer" / name, copy / name)

    return _edited(export, directory / "export", edit_files=replace)


def test_byte_fallback_models_get_the_python_runtimes_ids(t5_export, tmp_path):
    """mT5's model spells unknown characters in byte pieces, tokenizers (byte_fallback false in the
    converted tokenizer.json) gives one <unk> per run of them: libstarflow merges each run."""
    export = _variant(t5_export, tmp_path, byte_fallback=True)
    prompts = corpus()
    ids, mask = cpp_tokenize(BUILD, export, prompts, tmp_path)
    want_ids, want_mask = python_tokenize(export, prompts)
    differ = [
        i for i in range(len(prompts)) if (ids[i] != want_ids[i]).any() or (mask[i] != want_mask[i]).any()
    ]
    assert not differ, [(prompts[i], ids[i].tolist(), want_ids[i].tolist()) for i in differ[:5]]
    assert (ids == UNK).any(axis=1).sum() > 100  # the merged runs
    # a byte piece's name in the text is that piece to tokenizers, text to SentencePiece: refused
    args = ["--artifacts", export, "--tokenize", "--prompt", "a cat", "--prompt", "a <0xF0> cat"]
    result = run(built(BUILD) / "starflow-run", *args, "--out", tmp_path / "bytes.npy")
    assert result.returncode == 1 and "prompt 1: contains '<0xF0>', a byte piece's name" in result.stderr


@pytest.mark.parametrize(
    ("option", "phrase"),
    [
        ("remove_extra_whitespaces", "keeps extra whitespace (remove_extra_whitespaces false)"),
        ("add_dummy_prefix", "adds no '\u2581' before the text (add_dummy_prefix false)"),
    ],
)
def test_models_normalising_unlike_tokenizer_json_are_refused(t5_export, tmp_path, option, phrase):
    """transformers converts these to T5's tokenizer.json all the same (WhitespaceSplit, Metaspace):
    their ids would differ from the Python runtime's."""
    export = _variant(t5_export, tmp_path, **{option: False})
    args = ["--artifacts", export, "--tokenize", "--prompt", "a cat", "--out", tmp_path / "ids.npy"]
    result = run(built(BUILD) / "starflow-run", *args)
    assert result.returncode == 1 and f"spiece.model: {phrase}" in result.stderr, result.stderr


MANIFEST_REFUSALS = {  # name: (manifest edit, what both readers say)
    "unlisted-tokenizer": (
        lambda d: d.update(files=[f for f in d["files"] if f["file"] != "tokenizer.json"]),
        "names 'tokenizer.json', which files does not list",
    ),
    "unlisted-model": (_unlist_the_model, "names 'spiece.model', which files does not list"),
    "label-table-model": (
        lambda d: d["text"]["component"].update(kind="label-table"),
        "must be null for a label-table component",
    ),
}


@pytest.mark.parametrize("name", MANIFEST_REFUSALS)
def test_both_manifest_readers_refuse_text_files_alike(t5_export, tmp_path, name):
    edit, phrase = MANIFEST_REFUSALS[name]
    directory = _edited(t5_export, tmp_path / name, edit)
    with pytest.raises(StarflowError, match=phrase):
        Manifest.load(directory)
    args = ["--artifacts", directory, "--tokenize", "--prompt", "a cat", "--out", tmp_path / "ids.npy"]
    result = run(built(BUILD) / "starflow-run", *args)
    assert result.returncode == 1 and phrase in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("extra", "phrase"),
    [
        (["--noise", "n.npy", "--mask-out", "m.npy"], "--mask-out applies to --tokenize"),
        (["--tokenize", "--prompt", "a", "--mask-out", "./o.npy"], "--mask-out: './o.npy' is --out's file"),
    ],
    ids=["without-tokenize", "same-as-out"],
)
def test_mask_out_is_refused_where_it_cannot_apply(tmp_path, extra, phrase):
    """One line, before the export is read (there is none here)."""
    args = ["--artifacts", tmp_path / "none", "--out", "o.npy", *extra]
    result = subprocess.run(
        [str((built(BUILD) / "starflow-run").resolve()), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 1 and phrase in result.stderr and result.stderr.count("\n") == 1, (
        result.stderr
    )
    assert not list(tmp_path.glob("*.npy"))
