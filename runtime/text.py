"""Prompts -> text embeddings at run time: `tokenizer.json` plus the exported text-encoder graph.

numpy and `tokenizers` only (never torch or transformers). The ids and mask fed to the graph are
the ones transformers gives at export time (`padding="max_length"`, `truncation=True`), so the
embeddings match the PyTorch encoder; the component entry of the export says how to pad.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from starflow.contract.manifest import TextComponent, inside
from starflow.core.checks import check_prompt_list
from starflow.core.errors import StarflowError
from starflow.runtime.backends import Runner

KINDS = ("hf-encoder", "label-table")


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise StarflowError(
            "the text encoder needs the tokenizers package: pip install 'starflow[onnx]'"
        ) from None
    return tokenizers


def warn_truncated(lengths: list[int], max_length: int) -> None:
    """One warning per prompt longer than the encoder's token length (shared with the torch side)."""
    for index, length in enumerate(lengths):
        if length > max_length:
            warnings.warn(
                f"prompt {index} has {length} tokens, more than the text encoder's max_length "
                f"{max_length}; it was truncated",
                stacklevel=3,
            )


class TextEncoderRunner:
    """encode(prompts) -> embeddings (B, txt_len, dim) float32.

    Owns its tokenizers; borrows `runner` (the caller opened it and keeps it alive). Not
    thread-safe, like the Runner it drives. Returned arrays belong to the caller.
    """

    def __init__(self, directory: Path, component: TextComponent, runner: Runner):
        tokenizers = _import_tokenizers()
        if component.kind not in KINDS:
            raise StarflowError(f"text encoder: unknown kind {component.kind!r}; this runtime reads {KINDS}")
        self.kind = component.kind
        self.classes = component.classes
        self.token_length = component.token_length
        self.runner = runner
        path = inside(Path(directory), component.tokenizer)
        if not path.is_file():
            raise StarflowError(f"text encoder: tokenizer file {path} is missing")
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
            self._untruncated = tokenizers.Tokenizer.from_file(str(path))  # counts tokens for the warning
        except Exception as err:  # tokenizers raises plain Exception for a bad file
            raise StarflowError(f"text encoder: cannot read tokenizer {path}: {err}") from None
        self._untruncated.no_padding()
        self._untruncated.no_truncation()
        pad_id = component.pad_id
        pad_token = self._tokenizer.id_to_token(pad_id)
        if pad_token is None:
            raise StarflowError(f"text encoder: pad_id {pad_id} is not in the vocabulary of {path}")
        # The export saves transformers' sides (right for T5); the lengths come from the component.
        pad_side = (self._tokenizer.padding or {}).get("direction", "right")
        cut_side = (self._tokenizer.truncation or {}).get("direction", "right")
        self._tokenizer.enable_padding(
            length=self.token_length, pad_id=pad_id, pad_token=pad_token, direction=pad_side
        )
        self._tokenizer.enable_truncation(max_length=self.token_length, direction=cut_side)

    def check_known(self, prompts: list[str]) -> None:
        """A label-table model knows only its classes' prompts (and "")."""
        check_prompt_list(prompts)
        if self.classes is not None:
            for prompt in prompts:
                if prompt and prompt not in self.classes:
                    raise StarflowError(
                        f"prompt {prompt!r}: this model knows the prompts {list(self.classes)}"
                    )

    def tokenize(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), both int64 (B, token_length); warns when it truncates."""
        self.check_known(prompts)
        warn_truncated([len(e.ids) for e in self._untruncated.encode_batch(prompts)], self.token_length)
        encodings = self._tokenizer.encode_batch(prompts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return ids, mask

    def encode(self, prompts: list[str]) -> np.ndarray:
        ids, mask = self.tokenize(prompts)
        out = self.runner.run({"input_ids": ids, "attention_mask": mask})["embeddings"]
        return out.astype(np.float32, copy=False)
