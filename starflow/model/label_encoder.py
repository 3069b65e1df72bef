"""Class labels as "text": a label-embedding encoder that feeds the model's text pathway.

STARFlow conditions through prepended text tokens `y (B, txt_size, txt_dim)`. A class-conditional
model keeps that pathway and swaps the T5 encoder for a learned table: one row per class plus a
learned null row, the "empty prompt" of classifier-free guidance and of label dropout.
It ships beside the flow checkpoint as `<name>.labels.safetensors`, so `load_model` keeps
loading the flow file alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from starflow.core.atomic import atomic_path
from starflow.core.bounded import parse_json
from starflow.core.errors import StarflowError

CLASSES_METADATA_KEY = "starflow_classes"


class LabelEncoder(nn.Module):
    """labels (B,) -> y (B, txt_size, txt_dim); label `num_classes` is the null condition."""

    def __init__(self, classes: list[str], txt_size: int, txt_dim: int):
        super().__init__()
        self.classes = list(classes)
        self.txt_size, self.txt_dim = txt_size, txt_dim
        self.embedding = nn.Embedding(len(classes) + 1, txt_size * txt_dim)

    @property
    def null_label(self) -> int:
        return len(self.classes)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding(labels).unflatten(-1, (self.txt_size, self.txt_dim))

    def label_of(self, prompt: str) -> int:
        """The class index of a prompt; the error lists the prompts this encoder knows."""
        if prompt not in self.classes:
            raise StarflowError(f"prompt {prompt!r}: this model knows the prompts {self.classes}")
        return self.classes.index(prompt)


def labels_path(checkpoint: str | Path) -> Path:
    """`model.safetensors` -> `model.labels.safetensors`."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".labels.safetensors")


def save_label_encoder(encoder: LabelEncoder, path: Path) -> None:
    """Atomically write the table with the class names in the metadata."""
    metadata = {CLASSES_METADATA_KEY: json.dumps(encoder.classes)}
    state = {"embedding.weight": encoder.embedding.weight.detach().contiguous().cpu()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata=metadata)


def load_label_encoder(path: Path, txt_size: int, txt_dim: int) -> LabelEncoder:
    if not path.is_file():
        raise StarflowError(f"label encoder {path}: no such file (a class-conditional checkpoint needs it)")
    try:
        with safe_open(str(path), framework="pt") as f:
            classes = parse_json((f.metadata() or {}).get(CLASSES_METADATA_KEY, "null"), "classes")
            weight = f.get_tensor("embedding.weight")
    except (SafetensorError, OSError, ValueError) as err:
        raise StarflowError(f"label encoder {path}: corrupt or incomplete ({err})") from None
    if not isinstance(classes, list) or weight.shape != (len(classes) + 1, txt_size * txt_dim):
        raise StarflowError(
            f"label encoder {path}: table {tuple(weight.shape)} does not fit {classes} classes + null "
            f"with txt_size {txt_size} x txt_dim {txt_dim}"
        )
    encoder = LabelEncoder(classes, txt_size, txt_dim)
    encoder.embedding.weight.data.copy_(weight)
    return encoder.eval()
