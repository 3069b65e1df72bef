"""STARFlow model configuration: one dataclass, a table of presets, and the YAML readers.

Field names are the official training arguments (`channel_size`, `img_size`, `layers_per_block`,
...) so an official YAML maps one to one. Two YAML forms are read:

- official: a list under `arguments:` of `- key: value` items, lists as space-separated strings;
  every other top-level key (for example a fixture's `fixture:` section) is ignored;
- ours: a mapping under `model:` with the same keys, lists as YAML lists.

Keys that are not model options (training and data settings such as `lr`, `batch_size`) are
accepted and kept in `StarFlowConfig.extra`, because official configs mix them in.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from starflow.atomic import atomic_path
from starflow.errors import StarflowError

# The embedded class-conditional digits model (`scripts/train_demo.sh`), label table beside it.
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "digits.safetensors"
NORM_TYPES = ("layer_norm", "rms_norm")
SEQ_ORDERS = ("L2R", "R2L")

# Spatial downsampling of the VAEs the official configs name (pixels per latent pixel).
VAE_DOWNSAMPLE = {"sd-vae": 8, "sdxl-vae": 8, "Wan2.1": 8, "Wan2.2": 16}


@dataclasses.dataclass
class StarFlowConfig:
    """Every architecture option of the official `Model`, with the official defaults."""

    channel_size: int = 3  # latent channels C
    img_size: int = 32  # pixels when `vae` is set (the official convention), else latent pixels
    patch_size: int = 4
    channels: int = 512  # transformer width of the shallow blocks
    blocks: int = 4  # used only when layers_per_block has one entry
    layers_per_block: list[int] = dataclasses.field(default_factory=lambda: [8])
    head_dim: int = 64
    num_heads: int | None = None  # default: channels // head_dim
    num_kv_heads: int | None = None  # GQA when smaller than num_heads
    rope: bool = False  # RoPE; otherwise a learned pos_embed per block
    pt_seq_len: int | None = None  # RoPE position scale; default latent side / patch
    sos: bool = False
    txt_size: int = 0  # text tokens
    txt_dim: int = 0  # text encoder width; official YAMLs omit it (inferred from a checkpoint)
    cond_top_only: bool = False
    use_softplus: bool = False
    use_final_norm: bool = False
    soft_clip: float = 0.0
    seq_order: str = "R2L"
    norm_type: str = "layer_norm"
    use_swiglu: bool = False
    use_qk_norm: bool = False
    use_post_norm: bool = False
    use_bias: bool = True
    top_block_channels: int | None = None
    temporal_causal: int = 0
    shallow_block_local: bool = False
    local_attn_window: int | None = None
    learnable_self_denoiser: bool = False
    conditional_denoiser: bool = False
    use_pretrained_lm: str | None = None
    noise_std: float = 0.3
    cfg: float = 0.0
    vae: str | None = None
    text: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived fields ------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.layers_per_block) if len(self.layers_per_block) > 1 else self.blocks

    @property
    def block_layers(self) -> list[int]:
        """Layers of each block in forward order (blocks 0..N-2 shallow, N-1 deep)."""
        if len(self.layers_per_block) == 1:
            return self.layers_per_block * self.blocks
        return list(self.layers_per_block)

    @property
    def latent_size(self) -> int:
        """Latent side length the model was trained at (img_size divided by the VAE factor)."""
        if self.vae is None:
            return self.img_size
        factor = next((f for name, f in VAE_DOWNSAMPLE.items() if name in self.vae), None)
        if factor is None:
            raise StarflowError(
                f"config key 'vae': unknown VAE {self.vae!r}; known names contain one of "
                f"{sorted(VAE_DOWNSAMPLE)}"
            )
        return self.img_size // factor

    @property
    def token_dim(self) -> int:
        """Channels of one token D = patch_size^2 * channel_size."""
        return self.patch_size**2 * self.channel_size

    @property
    def rope_seq_len(self) -> int:
        return self.pt_seq_len or self.latent_size // self.patch_size

    @property
    def deep_channels(self) -> int:
        return self.top_block_channels or self.channels

    def heads(self, width: int) -> tuple[int, int]:
        """(num_heads, num_kv_heads) of a block of the given width, as the official code derives."""
        num_heads = self.num_heads or width // self.head_dim
        return num_heads, self.num_kv_heads or num_heads

    def block_flips(self) -> list[bool]:
        """Whether block i (forward order) reverses the token order (the `seq_order` rule)."""
        n = self.num_blocks
        offset = 1 if self.seq_order == "L2R" else 0
        return [bool((i + offset) % 2) for i in range(n)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        def bad(key: str, why: str) -> StarflowError:
            return StarflowError(f"config key '{key}': {why}")

        if self.norm_type not in NORM_TYPES:
            raise bad("norm_type", f"got {self.norm_type!r}, allowed values are {list(NORM_TYPES)}")
        if self.seq_order not in SEQ_ORDERS:
            raise bad("seq_order", f"got {self.seq_order!r}, allowed values are {list(SEQ_ORDERS)}")
        for key in ("channel_size", "img_size", "patch_size", "channels", "head_dim"):
            if getattr(self, key) <= 0:
                raise bad(key, f"must be a positive integer, got {getattr(self, key)}")
        if not self.layers_per_block or any(n < 0 for n in self.layers_per_block):
            raise bad("layers_per_block", f"must be non-negative integers, got {self.layers_per_block}")
        if self.num_blocks < 1:
            raise bad("blocks", f"must be at least 1, got {self.num_blocks}")
        if self.block_layers[-1] == 0:
            raise bad("layers_per_block", "the deep (last) block needs at least one layer")
        if self.rope and self.head_dim % 4:
            raise bad("head_dim", f"RoPE needs a multiple of 4, got {self.head_dim}")
        if self.rope and self.txt_size > 0 and self.head_dim < 16:
            raise bad("head_dim", f"RoPE with text needs head_dim >= 16, got {self.head_dim}")
        if self.cond_top_only and self.txt_size <= 0:
            raise bad("cond_top_only", "requires txt_size > 0")
        for width_key, width in (
            ("channels", self.channels),
            ("top_block_channels", self.deep_channels),
        ):
            heads, kv_heads = self.heads(width)
            if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
                raise bad(
                    "num_kv_heads",
                    f"num_heads={heads} must be a positive multiple of num_kv_heads={kv_heads} "
                    f"(block width {width_key}={width})",
                )
        if self.soft_clip < 0:
            raise bad("soft_clip", f"must be >= 0, got {self.soft_clip}")
        if self.latent_size % self.patch_size:
            raise bad(
                "patch_size",
                f"latent size {self.latent_size} is not divisible by patch_size {self.patch_size}",
            )
        unsupported = {
            "use_pretrained_lm": self.use_pretrained_lm,
            "temporal_causal": self.temporal_causal,
            "shallow_block_local": self.shallow_block_local,
            "local_attn_window": self.local_attn_window,
            "learnable_self_denoiser": self.learnable_self_denoiser,
        }
        for key, value in unsupported.items():
            if value:
                raise bad(key, f"{value!r} is not supported yet (video and pretrained-LM options)")


PRESETS: dict[str, dict[str, Any]] = {
    # Fixture-sized text-to-image model: the quickstart and unit tests run it in seconds.
    "tiny-t2i": dict(
        channel_size=4, img_size=8, patch_size=1, channels=64, layers_per_block=[1, 1, 2],
        head_dim=16, rope=True, sos=True, txt_size=6, txt_dim=32, cond_top_only=True,
        use_softplus=True, use_final_norm=True, soft_clip=4.0, seq_order="L2R",
    ),
    # The runtime benchmark's model (issue: standalone runtime).
    "bench-256": dict(
        channel_size=4, img_size=16, patch_size=1, channels=256, layers_per_block=[1, 1, 1, 4],
        head_dim=64, rope=True, sos=True, txt_size=16, txt_dim=64, cond_top_only=True,
        use_softplus=True, use_final_norm=True, soft_clip=4.0, seq_order="L2R",
    ),
    # The official 3B text-to-image model (configs/starflow_3B_t2i_256x256.yaml + flan-t5-xl).
    "starflow-3b-t2i": dict(
        channel_size=4, img_size=256, patch_size=1, channels=3072,
        layers_per_block=[2, 2, 2, 2, 2, 24], head_dim=64, rope=True, sos=True, txt_size=128,
        txt_dim=2048, cond_top_only=True, use_softplus=True, use_final_norm=True, soft_clip=4.0,
        seq_order="L2R", noise_std=0.3, cfg=2.5, vae="stabilityai/sd-vae-ft-ema",
        text="google/flan-t5-xl",
    ),
}  # fmt: skip
# The 3B shapes with the deep block cut to 2 layers: the scale check of benchmarks and exports.
PRESETS["starflow-3b-deep2"] = {**PRESETS["starflow-3b-t2i"], "layers_per_block": [2] * 6}


# ---- reading -------------------------------------------------------------------------------
_FIELDS = {f.name: f for f in dataclasses.fields(StarFlowConfig) if f.name != "extra"}
_HINTS = typing.get_type_hints(StarFlowConfig)


def _coerce(key: str, value: Any) -> Any:
    """Convert a YAML value to the field's type, with an error that names the key."""
    hint = _HINTS[key]
    optional = type(None) in typing.get_args(hint)  # `X | None`
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if value is None or (optional and value in ("None", "none", "null", "")):
        if optional:
            return None
        raise StarflowError(f"config key '{key}': must not be empty")
    try:
        if typing.get_origin(base) is list:
            items = value.split() if isinstance(value, str) else value
            items = items if isinstance(items, list) else [items]
            return [_to_int(v) for v in items]
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes"):
                    return True
                if value.lower() in ("0", "false", "no"):
                    return False
                raise ValueError
            return bool(_to_int(value))
        if base is int:
            return _to_int(value)
        if base is float:
            if isinstance(value, list):  # official `cfg` is `nargs='+'`
                value = value[0]
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise StarflowError(
            f"config key '{key}': expected {getattr(base, '__name__', base)}, got {value!r}"
        ) from None


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError
    if isinstance(value, str):
        return int(float(value)) if "." in value or "e" in value.lower() else int(value)
    return int(value)


def config_from_dict(options: dict[str, Any], source: str = "config") -> StarFlowConfig:
    """Typed config from a flat mapping; keys that are not model options go to `extra`."""
    known, extra = {}, {}
    for key, value in options.items():
        if key in _FIELDS:
            known[key] = _coerce(key, value)
        else:
            extra[key] = value
    try:
        return StarFlowConfig(**known, extra=extra)
    except StarflowError as err:
        raise StarflowError(f"{source}: {err}") from None


def load_config(path_or_preset: str | Path) -> StarFlowConfig:
    """Read a preset name (see PRESETS), an official YAML (`arguments:`) or ours (`model:`)."""
    name = str(path_or_preset)
    if name in PRESETS:
        return config_from_dict(PRESETS[name], source=f"preset {name!r}")
    path = Path(name)
    if not path.is_file():
        raise StarflowError(f"config {name!r}: no such file and not a preset; presets are {sorted(PRESETS)}")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise StarflowError(f"config {path}: not valid YAML ({err})") from None
    if isinstance(document, dict) and isinstance(document.get("arguments"), list):
        options: dict[str, Any] = {}
        for item in document["arguments"]:
            if not isinstance(item, dict):
                raise StarflowError(
                    f"config {path}: every item under 'arguments:' must be 'key: value', got {item!r}"
                )
            options.update(item)
    elif isinstance(document, dict) and isinstance(document.get("model"), dict):
        options = document["model"]
    else:
        raise StarflowError(f"config {path}: expected an official 'arguments:' list or a 'model:' mapping")
    return config_from_dict(options, source=f"config {path}")


def save_config(config: StarFlowConfig, path: str | Path) -> None:
    """Write our YAML form (`model:` mapping); `extra` keys are kept."""
    options = {k: v for k, v in config.to_dict().items() if k != "extra"}
    options.update(config.extra)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump({"model": options}, sort_keys=False))
