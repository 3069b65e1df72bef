"""Export of the text encoder: `text_encoder.fp32.onnx` (ids, mask -> embeddings) + `tokenizer.json`.

Both encoder kinds are exported the same way, so a runtime needs one code path: tokenize with
`tokenizer.json` (padded and truncated to `token_length`), run the graph. Only the batch is
dynamic; the token length is fixed by the flow's txt_size. The export is checked end to end,
tokenizer file included, against the PyTorch encoder before it is returned.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from starflow.contract.manifest import Comparison, TensorSpec, TextComponent
from starflow.core.atomic import atomic_path
from starflow.core.errors import StarflowError
from starflow.export.exporter import DEFAULT_OPSET, dynamic_shapes_of, export_module
from starflow.export.graphs import GraphSpec
from starflow.model.text_encoder import LabelTextEncoder, TextEncoder

TOKENIZER_FILE = "tokenizer.json"
MAX_ABS_ERROR = 1e-4  # fp32 graph vs fp32 PyTorch; the tiny T5 measures ~1e-6
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


def export_text_encoder(
    encoder: TextEncoder, directory: Path, opset: int = DEFAULT_OPSET
) -> tuple[GraphSpec, TextComponent]:
    """Write the graph and tokenizer into `directory`, validate them; return (spec, manifest entry).

    The graph is written in place like the block graphs (ONNX external data names its own file,
    so it cannot go through a temporary name); export_onnx works in a temporary directory anyway.
    """
    directory = Path(directory)
    spec = text_encoder_spec(encoder)
    encoder.eval()
    example = encoder.tokenize(_check_prompts(encoder))  # batch 2: the batch stays symbolic
    export_module(encoder, example, dynamic_shapes_of(spec), spec, directory / spec.file, opset)
    _save_tokenizer(encoder, directory / TOKENIZER_FILE)
    label = isinstance(encoder, LabelTextEncoder)
    component = TextComponent(
        kind="label-table" if label else "hf-encoder",
        graph=spec.name,
        tokenizer=TOKENIZER_FILE,
        token_length=encoder.max_length,
        pad_id=encoder.labels.null_label if label else encoder.tokenizer.pad_token_id,
        classes=tuple(encoder.labels.classes) if label else None,
        source=encoder.source,
    )
    for result in validate_text_encoder(encoder, directory, component):
        if not result.passed:
            raise StarflowError(
                f"graph {result.graph}: {result.case}: max abs error {result.max_abs_error:.3g} against "
                f"PyTorch exceeds {result.limit:.3g}"
            )
    return spec, component


def validate_text_encoder(
    encoder: TextEncoder, directory: Path, component: TextComponent
) -> list[Comparison]:
    """Runtime path (tokenizer.json + graph in onnxruntime) vs `encoder.encode`, one prompt at a time."""
    from starflow.runtime.backends import OrtRunner
    from starflow.runtime.text import TextEncoderRunner

    name = component.graph
    runner = OrtRunner(name, Path(directory) / f"{name}.onnx")
    text = TextEncoderRunner(directory, component, runner)
    results = []
    for prompt in _check_prompts(encoder):
        got = text.encode([prompt])
        want = encoder.encode([prompt]).cpu().numpy()
        error = float(np.abs(got - want).max()) if got.shape == want.shape else np.inf
        results.append(
            Comparison.of(
                name,
                f"prompt {prompt!r}",
                "embeddings",
                want.shape,
                error,
                float(np.abs(want).max()),
                MAX_ABS_ERROR,
            )
        )
    return results
