"""Export of the text encoder: `text_encoder.fp32.onnx` (ids, mask -> embeddings) + `tokenizer.json`.

Both encoder kinds are exported the same way, so a runtime needs one code path: tokenize with
`tokenizer.json` (padded and truncated to `token_length`), run the graph. Only the batch is
dynamic; the token length is fixed by the flow's txt_size. The export is checked end to end,
tokenizer file included (the runtime's `TextEncoderRunner`), against the PyTorch encoder.

A T5-family encoder also carries its SentencePiece model (`spiece.model`, copied as it is), from
which its tokenizer.json was converted: what libstarflow tokenizes with, through the SentencePiece
library (the C++ side has no `tokenizers`); tests/runtime/cpp/test_tokenizer.py holds the two to the
same ids.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from starflow.contract.manifest import TensorSpec, TextComponent, Tolerance
from starflow.core.atomic import atomic_path
from starflow.export.graphs import ComponentGraph, GraphSpec
from starflow.model.text_encoder import T5_ENCODERS, HFTextEncoder, LabelTextEncoder, TextEncoder
from starflow.runtime.backends import Runner
from starflow.runtime.text import TextEncoderRunner

TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "spiece.model"  # T5's own name for it
TOLERANCE = Tolerance(atol=1e-4, rtol=0.0)  # fp32 graph vs fp32 PyTorch; the tiny T5 measures ~1e-6
CHECK_PROMPT = "a photo of a cat"  # the non-empty validation prompt of HF encoders


def text_encoder_spec(encoder: TextEncoder) -> GraphSpec:
    length = encoder.max_length
    return GraphSpec(
        None,
        "text_encoder",
        "fp32",
        (
            TensorSpec("input_ids", "int64", ("batch", length)),
            TensorSpec("attention_mask", "int64", ("batch", length)),
        ),
        (TensorSpec("embeddings", "float32", ("batch", encoder.txt_size, encoder.dim)),),
    )


def _check_prompts(encoder: TextEncoder) -> list[str]:
    """The empty prompt (the guidance "unconditional") and one real prompt."""
    return ["", encoder.labels.classes[0] if isinstance(encoder, LabelTextEncoder) else CHECK_PROMPT]


def _save_tokenizer(encoder: TextEncoder, path: Path) -> None:
    """Save with padding/truncation set as transformers applies them (sides included)."""
    if isinstance(encoder, LabelTextEncoder):
        tokenizer = encoder.build_tokenizer()
    else:
        from tokenizers import Tokenizer

        hf = encoder.tokenizer
        tokenizer = Tokenizer.from_str(hf.backend_tokenizer.to_str())  # a copy: hf's stays untouched
        tokenizer.enable_padding(
            length=encoder.max_length,
            pad_id=hf.pad_token_id,
            pad_token=hf.pad_token,
            direction=hf.padding_side,
        )
        tokenizer.enable_truncation(max_length=encoder.max_length, direction=hf.truncation_side)
    with atomic_path(path) as tmp:
        tokenizer.save(str(tmp))


def _sentencepiece_model(encoder: TextEncoder) -> Path | None:
    """The SentencePiece model a T5-family tokenizer was loaded beside (transformers' `vocab_file`),
    or None: other encoders' tokenizers are not the SentencePiece one behind a Unigram vocabulary."""
    if not isinstance(encoder, HFTextEncoder) or encoder.model.config.model_type not in T5_ENCODERS:
        return None
    path = getattr(encoder.tokenizer, "vocab_file", None)
    return Path(path) if path and Path(path).suffix == ".model" and Path(path).is_file() else None


def _copy_to(source: Path, name: str) -> Callable[[Path], None]:
    """A writer of `source`'s bytes into an export directory as `name`."""

    def write(directory: Path) -> None:
        with atomic_path(directory / name) as tmp:
            shutil.copyfile(source, tmp)

    return write


def text_encoder_graph(encoder: TextEncoder) -> ComponentGraph:
    """The graph and tokenizer of `encoder`, checked through the runtime's text encoder (tokenizer
    file, then graph) against `encoder.encode`, one prompt at a time."""
    spec = text_encoder_spec(encoder)
    label = isinstance(encoder, LabelTextEncoder)
    sentencepiece = _sentencepiece_model(encoder)
    files = {TOKENIZER_FILE: lambda directory: _save_tokenizer(encoder, directory / TOKENIZER_FILE)}
    if sentencepiece is not None:
        files[SENTENCEPIECE_FILE] = _copy_to(sentencepiece, SENTENCEPIECE_FILE)
    component = TextComponent(
        kind="label-table" if label else "hf-encoder",
        graph=spec.name,
        tokenizer=TOKENIZER_FILE,
        token_length=encoder.max_length,
        pad_id=encoder.labels.null_label if label else encoder.tokenizer.pad_token_id,
        classes=tuple(encoder.labels.classes) if label else None,
        source=encoder.source,
        sentencepiece=SENTENCEPIECE_FILE if sentencepiece is not None else None,
    )

    def runtime(runner: Runner, directory: Path) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        text = TextEncoderRunner(directory, component, runner)
        return lambda feeds: {"embeddings": text.encode(feeds["prompts"].tolist())}

    prompts = _check_prompts(encoder)
    return ComponentGraph(
        spec=spec,
        module=encoder.eval(),
        example=encoder.tokenize(prompts),  # batch 2: the batch stays symbolic
        cases={f"prompt {prompt!r}": {"prompts": np.array([prompt])} for prompt in prompts},
        reference=lambda feeds: {"embeddings": encoder.encode(feeds["prompts"].tolist()).cpu().numpy()},
        tolerance=TOLERANCE,
        entry=component,
        files=files,
        runtime=runtime,
        torch_export=not label,  # the label table traces as a block
    )
