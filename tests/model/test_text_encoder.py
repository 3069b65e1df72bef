"""Text encoders: PyTorch vs the torch-free runtime (tokenizer.json + ONNX graph), both kinds.

The T5 encoder is a tiny random one with a locally built tokenizer (no hub access), saved the
way Hugging Face ships models, so `HFTextEncoder.from_directory` takes its real path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("onnxruntime")

from starflow.contract.manifest import TextComponent, Tolerance  # noqa: E402
from starflow.core.errors import StarflowError  # noqa: E402
from starflow.export import text_encoder as export_text  # noqa: E402
from starflow.export.components import export_component, validate_component  # noqa: E402
from starflow.export.graphs import GraphSpec  # noqa: E402
from starflow.export.text_encoder import text_encoder_graph  # noqa: E402
from starflow.model.label_encoder import LabelEncoder  # noqa: E402
from starflow.model.text_encoder import HFTextEncoder, LabelTextEncoder  # noqa: E402
from starflow.runtime.backends import OrtRunner  # noqa: E402
from starflow.runtime.text import TextEncoderRunner  # noqa: E402

MAX_LENGTH = 8
LONG_PROMPT = "a red cat on the big house with a tree and a blue sky"  # 15 tokens with </s>
PROMPTS = ["", "a red cat", "the small dog on a tree", LONG_PROMPT, "a 🦓 on a tree"]  # 🦓: <unk>
PARITY = 1e-5
CLASSES = [str(i) for i in range(10)]


def export_text_encoder(
    encoder: HFTextEncoder | LabelTextEncoder, directory: Path
) -> tuple[GraphSpec, TextComponent]:
    graph = text_encoder_graph(encoder)
    export_component(graph, directory)
    return graph.spec, graph.entry


@pytest.fixture(scope="module")
def t5(t5_dir: Path) -> HFTextEncoder:
    return HFTextEncoder.from_directory(t5_dir, MAX_LENGTH)


@pytest.fixture(scope="module")
def t5_export(
    t5: HFTextEncoder, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, GraphSpec, TextComponent]:
    directory = tmp_path_factory.mktemp("t5-export")
    spec, component = export_text_encoder(t5, directory)
    return directory, spec, component


@pytest.fixture(scope="module")
def labels() -> LabelTextEncoder:
    torch.manual_seed(1)
    return LabelTextEncoder(LabelEncoder(CLASSES, txt_size=1, txt_dim=8).eval())


@pytest.fixture(scope="module")
def label_export(
    labels: LabelTextEncoder, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, TextComponent]:
    directory = tmp_path_factory.mktemp("label-export")
    _, component = export_text_encoder(labels, directory)
    return directory, component


def runtime(directory: Path, component: TextComponent) -> TextEncoderRunner:
    return TextEncoderRunner(
        directory, component, OrtRunner(component.graph, directory / f"{component.graph}.onnx")
    )


def truncation_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "truncated" in str(w.message)]


# ---- Hugging Face (T5) encoder -------------------------------------------------------------------
def test_t5_export_writes_graph_tokenizer_and_component(t5_export, t5_dir):
    directory, spec, component = t5_export
    assert spec.name == "text_encoder.fp32" and spec.block is None
    assert [(t.name, t.dtype, t.shape) for t in spec.inputs + spec.outputs] == [
        ("input_ids", "int64", ("batch", MAX_LENGTH)),
        ("attention_mask", "int64", ("batch", MAX_LENGTH)),
        ("embeddings", "float32", ("batch", MAX_LENGTH, 32)),
    ]
    assert component == TextComponent(
        kind="hf-encoder",
        graph="text_encoder.fp32",
        tokenizer="tokenizer.json",
        token_length=MAX_LENGTH,
        pad_id=0,
        classes=None,
        source="tiny-t5",
        sentencepiece="spiece.model",
    )
    assert sorted(p.name for p in directory.iterdir()) == [
        "spiece.model",
        "text_encoder.fp32.onnx",
        "tokenizer.json",
    ]
    assert (directory / "spiece.model").read_bytes() == (t5_dir / "spiece.model").read_bytes()


def test_t5_runtime_matches_torch_ids_masks_and_embeddings(t5, t5_export):
    directory, _, component = t5_export
    text = runtime(directory, component)
    with warnings.catch_warnings(record=True) as torch_record:
        warnings.simplefilter("always")
        want_ids, want_mask = t5.tokenize(PROMPTS)
        want = t5.encode(PROMPTS).numpy()
    with warnings.catch_warnings(record=True) as runtime_record:
        warnings.simplefilter("always")
        ids, mask = text.tokenize(PROMPTS)
        got = text.encode(PROMPTS)
    expected = f"prompt 3 has 15 tokens, more than the text encoder's max_length {MAX_LENGTH}"
    for record in (torch_record, runtime_record):
        messages = truncation_warnings(record)
        assert len(messages) == 2 and all(m.startswith(expected) for m in messages)  # tokenize + encode
    np.testing.assert_array_equal(ids, want_ids.numpy())
    np.testing.assert_array_equal(mask, want_mask.numpy())
    assert ids.dtype == mask.dtype == np.int64
    assert ids[3, -1] == 1 and mask[3].all()  # truncation keeps room for </s>
    assert ids[0].tolist() == [1] + [0] * (MAX_LENGTH - 1)  # "" is just </s>, then padding
    assert got.dtype == np.float32 and got.shape == (len(PROMPTS), MAX_LENGTH, 32)
    assert np.abs(got - want).max() < PARITY
    assert not got[mask == 0].any()  # padding rows are zero: last_hidden_state * mask


def test_t5_empty_prompt_is_the_unconditional_embedding(t5, t5_export):
    directory, _, component = t5_export
    uncond = runtime(directory, component).encode([""])
    batched = t5.encode(["a cat", ""]).numpy()
    assert np.abs(uncond[0] - batched[1]).max() < PARITY
    assert np.abs(uncond[0, 0]).max() > 0  # the </s> row carries the encoding


def test_export_fails_when_the_graph_misses_the_limit(labels, tmp_path, monkeypatch):
    monkeypatch.setattr(export_text, "TOLERANCE", Tolerance(atol=-1.0, rtol=0.0))
    with pytest.raises(
        StarflowError,
        match=r"validation failed for 2 of 2 tensors:\n  graph text_encoder\.fp32, tensor embeddings",
    ):
        export_text_encoder(labels, tmp_path)


def test_validation_reports_each_prompt(t5, t5_export):
    directory, _, _ = t5_export
    results = validate_component(text_encoder_graph(t5), directory)
    assert [r.case for r in results] == ["prompt ''", "prompt 'a photo of a cat'"]
    assert all(r.passed and r.max_abs_error < PARITY for r in results)


# ---- class-label table ---------------------------------------------------------------------------
def test_label_export_matches_torch_and_empty_prompt_is_the_null_row(labels, label_export):
    directory, component = label_export
    assert component.kind == "label-table" and component.classes == tuple(CLASSES)
    assert component.token_length == 1 and component.pad_id == 10
    assert component.source == "label encoder" and component.sentencepiece is None
    text = runtime(directory, component)
    prompts = ["", "3", "7", ""]
    ids, mask = text.tokenize(prompts)
    want_ids, want_mask = labels.tokenize(prompts)
    assert ids.tolist() == want_ids.tolist() == [[10], [3], [7], [10]]
    assert mask.tolist() == want_mask.tolist() == [[0], [1], [1], [0]]
    got = text.encode(prompts)
    assert got.shape == (4, 1, 8)
    np.testing.assert_allclose(got, labels.encode(prompts).numpy(), atol=PARITY, rtol=0)
    null_row = labels.labels.embedding.weight[10].detach().numpy()
    np.testing.assert_allclose(got[0, 0], null_row, atol=PARITY, rtol=0)


def test_label_unknown_prompt_lists_the_classes_on_both_sides(labels, label_export):
    text = runtime(*label_export)
    for encode in (labels.encode, text.encode):
        with pytest.raises(StarflowError, match=r"'cat'.*\['0', '1', .*'9'\]"):
            encode(["3", "cat"])
        with pytest.raises(StarflowError, match="knows the prompts"):
            encode([" 3"])  # matched exactly, like LabelEncoder.label_of


def test_label_tokenizer_reserves_the_null_token():
    encoder = LabelTextEncoder(LabelEncoder(["cat", "<null>"], txt_size=1, txt_dim=2))
    with pytest.raises(StarflowError, match="<null>"):
        encoder.build_tokenizer()


# ---- bad input -----------------------------------------------------------------------------------
def test_missing_directory(tmp_path):
    with pytest.raises(StarflowError, match="no such directory"):
        HFTextEncoder.from_directory(tmp_path / "absent", MAX_LENGTH)


def test_directory_without_tokenizer_json(t5_dir, tmp_path):
    directory = tmp_path / "no-tokenizer"
    shutil.copytree(t5_dir, directory)
    (directory / "tokenizer.json").unlink()
    (directory / "spiece.model").unlink()  # transformers would convert tokenizer.json from it
    with pytest.raises(StarflowError, match="no usable tokenizer"):
        HFTextEncoder.from_directory(directory, MAX_LENGTH)


def test_decoder_only_model_is_refused(t5_dir, tmp_path):
    from transformers import GPT2Config

    directory = tmp_path / "gpt"
    shutil.copytree(t5_dir, directory)
    (directory / "config.json").unlink()
    GPT2Config(n_embd=16, n_layer=1, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(directory)
    with pytest.raises(StarflowError, match="decoder-only"):
        HFTextEncoder.from_directory(directory, MAX_LENGTH)


def test_hidden_size_mismatch_names_both_sizes(t5):
    t5.check_dim(32)
    with pytest.raises(StarflowError, match="hidden size 32, but the flow expects txt_dim 2048"):
        t5.check_dim(2048)


def test_empty_prompt_list_is_refused_on_both_sides(t5, labels, t5_export, label_export):
    directory, _, component = t5_export
    for encode in (
        t5.encode,
        labels.encode,
        runtime(directory, component).encode,
        runtime(*label_export).encode,
    ):
        with pytest.raises(StarflowError, match="prompts: pass at least one"):
            encode([])


def test_runtime_missing_tokenizer_file(t5_export, tmp_path):
    directory, _, component = t5_export
    shutil.copy(directory / "text_encoder.fp32.onnx", tmp_path)
    with pytest.raises(StarflowError, match="tokenizer file .* is missing"):
        runtime(tmp_path, component)


def test_runtime_text_imports_neither_torch_nor_transformers(t5_export):
    directory, _, component = t5_export
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from starflow.contract.manifest import TextComponent
        from starflow.runtime.backends import OrtRunner
        from starflow.runtime.text import TextEncoderRunner

        component = {component!r}
        directory = Path({str(directory)!r})
        runner = OrtRunner("text", directory / "text_encoder.fp32.onnx")
        out = TextEncoderRunner(directory, component, runner).encode(["a cat", ""])
        assert out.shape == (2, {MAX_LENGTH}, 32)
        assert "torch" not in sys.modules and "transformers" not in sys.modules, "heavy import"
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
