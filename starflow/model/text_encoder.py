"""Prompts -> text embeddings y (B, txt_size, txt_dim) in PyTorch: what the flow is conditioned on.

Two encoders share one interface (`tokenize`, `forward(input_ids, attention_mask)`, `encode`):
a Hugging Face encoder from a local directory (officially the `google/flan-t5-xl` encoder) and
the class-label table of class-conditional models. `forward` is the graph that gets exported;
the runtime reproduces `tokenize` from `tokenizer.json` (see starflow.runtime.text).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from starflow.core.checks import check_count, check_prompt_list
from starflow.core.errors import StarflowError
from starflow.model.label_encoder import LabelEncoder, labels_path, load_label_encoder
from starflow.runtime.text import warn_truncated

if TYPE_CHECKING:
    import tokenizers

    from starflow.core.config import StarFlowConfig

# T5-family encoders get their dedicated encoder-only class: the weights of the full
# encoder-decoder checkpoint load into it and the decoder is never built.
T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
DECODER_ONLY = ("ForCausalLM", "LMHeadModel")  # architecture-name endings of causal LMs
NULL_TOKEN = "<null>"  # the label table's pad token: the empty prompt, i.e. the null label


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise StarflowError(
            "Hugging Face text encoders need transformers: pip install 'starflow[components]'"
        ) from None
    return transformers


def _load_encoder(transformers: Any, config: Any, directory: Path) -> nn.Module:
    """The encoder module of the model in `directory`, fp32, in eval mode."""
    if not getattr(config, "is_encoder_decoder", False) and any(
        name.endswith(DECODER_ONLY) for name in getattr(config, "architectures", None) or []
    ):
        raise StarflowError(
            f"text encoder {directory}: {config.architectures} is a decoder-only model, not an encoder"
        )
    cls = getattr(transformers, T5_ENCODERS.get(config.model_type, "AutoModel"))
    try:
        # eager attention: T5's SDPA path does not export with a dynamic batch (torch 2.13).
        model = cls.from_pretrained(
            directory, local_files_only=True, dtype=torch.float32, attn_implementation="eager"
        )
    except Exception as err:  # transformers raises many types for missing/corrupt weights
        raise StarflowError(f"text encoder {directory}: cannot load the weights: {err}") from None
    if getattr(config, "is_encoder_decoder", False) and config.model_type not in T5_ENCODERS:
        model = model.get_encoder()  # e.g. BART: only the encoder half
    return model.eval().requires_grad_(False)


class HFTextEncoder(nn.Module):
    """A Hugging Face encoder: embeddings = last_hidden_state * mask (padding rows are zero)."""

    def __init__(self, tokenizer: Any, model: nn.Module, dim: int, max_length: int, source: str):
        super().__init__()
        self.tokenizer, self.model = tokenizer, model
        self.dim, self.max_length, self.source = dim, max_length, source

    @property
    def txt_size(self) -> int:
        """Rows of the embeddings: one per token."""
        return self.max_length

    @classmethod
    def from_directory(cls, directory: Path, max_length: int) -> HFTextEncoder:
        """Load the tokenizer and encoder from local files only (there is no hub access)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise StarflowError(f"text encoder {directory}: no such directory")
        check_count(max_length, "text encoder max_length")
        transformers = _import_transformers()
        try:
            config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
        except Exception as err:  # OSError, ValueError, KeyError depending on what is wrong
            raise StarflowError(
                f"text encoder {directory}: not a Hugging Face model directory (config.json): {err}"
            ) from None
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as err:  # as above
            raise StarflowError(
                f"text encoder {directory}: no usable tokenizer (tokenizer.json is needed): {err}"
            ) from None
        # Without either, transformers 5 builds its class's placeholder vocabulary (T5: 6 tokens).
        vocabulary = [directory / "tokenizer.json", getattr(tokenizer, "vocab_file", None)]
        if not any(path and Path(path).is_file() for path in vocabulary):
            raise StarflowError(
                f"text encoder {directory}: no usable tokenizer (tokenizer.json, or the vocabulary file "
                "it is converted from, e.g. T5's spiece.model, is needed)"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise StarflowError(
                f"text encoder {directory}: the tokenizer is not a fast (tokenizers) one; the runtime "
                "needs its tokenizer.json"
            )
        if tokenizer.pad_token_id is None:
            raise StarflowError(f"text encoder {directory}: the tokenizer has no pad token to pad with")
        dim = getattr(config, "hidden_size", None)
        if not isinstance(dim, int):
            raise StarflowError(f"text encoder {directory}: config.json names no hidden size")
        model = _load_encoder(transformers, config, directory)
        return cls(tokenizer, model, dim, max_length, directory.name)

    def check_dim(self, expected: int) -> None:
        """The flow's txt_dim must equal the encoder's hidden size."""
        if self.dim != expected:
            raise StarflowError(
                f"text encoder {self.source}: hidden size {self.dim}, but the flow expects txt_dim {expected}"
            )

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask) int64 (B, max_length); warns for each truncated prompt."""
        check_prompt_list(prompts)
        warn_truncated([len(ids) for ids in self.tokenizer(prompts)["input_ids"]], self.max_length)
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return tokens["input_ids"].long(), tokens["attention_mask"].long()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, dim)
        return h.float() * attention_mask[..., None].float()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        device = next(self.model.parameters()).device
        ids, mask = self.tokenize(prompts)
        return self(ids.to(device), mask.to(device))


class LabelTextEncoder(nn.Module):
    """Class labels behind the same interface: each prompt is one token, "" the null label."""

    max_length = 1

    def __init__(self, labels: LabelEncoder):
        super().__init__()
        self.labels = labels
        self.dim, self.txt_size = labels.txt_dim, labels.txt_size
        self.source = "label encoder"

    def check_dim(self, expected: int) -> None:
        if self.dim != expected:
            raise StarflowError(f"label encoder: txt_dim {self.dim}, but the model expects {expected}")

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask) int64 (B, 1); the null label is padding (mask 0)."""
        check_prompt_list(prompts)
        null = self.labels.null_label
        ids = torch.tensor([[self.labels.label_of(p) if p else null] for p in prompts])
        return ids, (ids != null).long()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, 1) ids -> (B, txt_size, dim); the mask is taken only to share the HF signature."""
        return self.labels(input_ids[:, 0])

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        device = self.labels.embedding.weight.device
        ids, mask = self.tokenize(prompts)
        return self(ids.to(device), mask.to(device))

    def build_tokenizer(self) -> tokenizers.Tokenizer:
        """A word-level tokenizer whose vocabulary is the class names plus the null label.

        No pre-tokenizer: the whole prompt is one token, matched exactly like `label_of` (class
        names may hold spaces). "" has no tokens and pads to NULL_TOKEN, the null label.
        """
        from tokenizers import Tokenizer, models

        classes = self.labels.classes
        if NULL_TOKEN in classes:
            raise StarflowError(f"label encoder: a class may not be named {NULL_TOKEN!r} (the null label)")
        vocab = {name: i for i, name in enumerate(classes)} | {NULL_TOKEN: self.labels.null_label}
        tokenizer = Tokenizer(models.WordLevel(vocab))
        tokenizer.enable_padding(length=1, pad_id=self.labels.null_label, pad_token=NULL_TOKEN)
        tokenizer.enable_truncation(max_length=1)
        return tokenizer


TextEncoder = HFTextEncoder | LabelTextEncoder


def text_encoder_for(
    config: StarFlowConfig, checkpoint: Path, directory: str | Path | None
) -> TextEncoder | None:
    """The flow's text encoder, checked to fit it: the Hugging Face encoder in `directory`, else the
    label table saved beside a class-conditional `checkpoint`; None when there is neither."""
    if directory is not None:
        if config.txt_dim == 0:
            raise StarflowError(f"text_encoder {directory}: this model is not text-conditioned")
        encoder = HFTextEncoder.from_directory(Path(directory), config.txt_size)
        encoder.check_dim(config.txt_dim)
        return encoder
    table = labels_path(checkpoint)
    if config.txt_dim > 0 and table.is_file():
        return LabelTextEncoder(load_label_encoder(table, config.txt_size, config.txt_dim))
    return None
