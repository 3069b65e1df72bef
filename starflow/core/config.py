"""STARFlow model configuration: one dataclass, a table of presets, and the YAML readers.

Field names are the official training arguments (`channel_size`, `img_size`, `layers_per_block`,
...) so an official YAML maps one to one. Two YAML forms are read:

- official: a list under `arguments:` of `- key: value` items, lists as space-separated strings;
  every other top-level key (for example a fixture's `fixture:` section) is ignored;
- ours: a mapping under `model:` with the same keys, lists as YAML lists; any other settings
  under a sibling `extra:` mapping.

In the official form, keys that are not model options (training and data settings such as `lr`,
`batch_size`) are accepted and kept in `StarFlowConfig.extra`, because official configs mix them
in; under `model:` an unknown key is a typo and is refused with the nearest known names. Every
value is range-checked when the config is made, and YAML files are read by
`starflow.core.bounded.read_yaml` (safe loader; size, alias, depth and number bounds).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any

import yaml

from starflow.core.atomic import atomic_path
from starflow.core.bounded import read_yaml
from starflow.core.errors import StarflowError

# The embedded class-conditional digits model (`scripts/train_demo.sh`), label table beside it.
DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "digits.safetensors"
# The embedded video model: moving digits (`scripts/train_video_demo.py`), label table beside it.
DEMO_VIDEO_CHECKPOINT = DEMO_CHECKPOINT.with_name("digits-video.safetensors")
NORM_TYPES = ("layer_norm", "rms_norm")
SEQ_ORDERS = ("L2R", "R2L")

# Spatial downsampling of the VAEs the official configs name (pixels per latent pixel).
VAE_DOWNSAMPLE = {"sd-vae": 8, "sdxl-vae": 8, "Wan2.1": 8, "Wan2.2": 16}
DENOISER_LAYERS = 8  # the official learnable self-denoiser (`NonCausalBlock(num_layers=8)`)
# The released models have at most 24 layers in a block; 100000 (a typo) would build for minutes.
MAX_LAYERS_PER_BLOCK = 1024


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
    # STARFlow-V (video): flip-in-frame permutations (and the denoiser's frame-block mask width),
    # frame-local shallow blocks, the deep block's attention window in frames (rolling
    # generation), the learned non-causal denoiser (text-conditioned, frame window)
    temporal_causal: int = 0
    shallow_block_local: bool = False
    local_attn_window: int | None = None
    learnable_self_denoiser: bool = False
    conditional_denoiser: bool = False
    denoiser_window: int | None = None
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

    def estimated_parameters(self) -> int:
        """The model's parameter count from the config alone (weights and biases of the linear
        layers, the norms and embeddings are left out: under 1% for real configs)."""
        D, hd = self.token_dim, self.head_dim

        def per_layer(width: int) -> int:
            heads, kv_heads = self.heads(width)
            mlp = (3 if self.use_swiglu else 2) * 4 * width * width
            return width * (heads + 2 * kv_heads) * hd + heads * hd * width + mlp

        total = 0
        for i, layers in enumerate(self.block_layers):
            deep = i == self.num_blocks - 1
            width = self.deep_channels if deep else self.channels
            text = self.txt_dim if deep or not self.cond_top_only else 0
            total += layers * per_layer(width) + (3 * D + text) * width if layers else 0
        if self.learnable_self_denoiser:
            text = self.txt_dim if self.conditional_denoiser else 0
            total += DENOISER_LAYERS * per_layer(self.channels) + (2 * D + text) * self.channels
        return total

    @property
    def video(self) -> bool:
        """A STARFlow-V model: it samples (B, T, C, H, W) clips (images are one-frame clips)."""
        return self.temporal_causal > 0 or self.shallow_block_local

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
        for key in ("channel_size", "img_size", "patch_size", "channels", "head_dim", "blocks"):
            if getattr(self, key) <= 0:
                raise bad(key, f"must be a positive integer, got {getattr(self, key)}")
        for key in ("num_heads", "num_kv_heads", "top_block_channels", "pt_seq_len"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise bad(key, f"must be a positive integer when set, got {getattr(self, key)}")
        for key in ("txt_size", "txt_dim"):
            if getattr(self, key) < 0:
                raise bad(key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("noise_std", "cfg", "soft_clip"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise bad(key, f"must be a finite number >= 0, got {value}")
        if not self.layers_per_block or any(n < 0 for n in self.layers_per_block):
            raise bad("layers_per_block", f"must be non-negative integers, got {self.layers_per_block}")
        if max(self.layers_per_block) > MAX_LAYERS_PER_BLOCK:
            raise bad(
                "layers_per_block",
                f"{max(self.layers_per_block)} layers in one block, "
                f"more than {MAX_LAYERS_PER_BLOCK} (a typo?)",
            )
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
        if self.latent_size % self.patch_size:
            raise bad(
                "patch_size",
                f"latent size {self.latent_size} is not divisible by patch_size {self.patch_size}",
            )
        if self.use_pretrained_lm:
            raise bad(
                "use_pretrained_lm",
                f"{self.use_pretrained_lm!r} is not supported (pretrained-LM deep blocks)",
            )
        self._validate_video(bad)

    def _validate_video(self, bad: typing.Callable[[str, str], StarflowError]) -> None:
        """The official asserts, plus what frame positions need (RoPE's time axis, so text)."""
        if self.temporal_causal < 0:
            raise bad("temporal_causal", f"must be >= 0, got {self.temporal_causal}")
        for key in ("local_attn_window", "denoiser_window"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise bad(key, f"must be a positive number of frames when set, got {getattr(self, key)}")
        if self.temporal_causal and self.seq_order != "L2R":
            raise bad("temporal_causal", "requires seq_order: L2R")
        if self.shallow_block_local and not self.cond_top_only:
            raise bad("shallow_block_local", "requires cond_top_only")
        if self.local_attn_window and not self.shallow_block_local:
            raise bad("local_attn_window", "requires shallow_block_local")
        if self.conditional_denoiser and not self.learnable_self_denoiser:
            raise bad("conditional_denoiser", "requires learnable_self_denoiser")
        if self.video and not (self.rope and self.txt_size > 0):
            raise bad(
                "temporal_causal" if self.temporal_causal else "shallow_block_local",
                "video models need rope: 1 and txt_size > 0 (the frame index is RoPE's text/time axis)",
            )


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
    # The official STARFlow-V 7B text-to-video model (configs/starflow-v_7B_t2v_caus_480p.yaml).
    "starflow-v": dict(
        channel_size=48, img_size=640, patch_size=1, channels=3072, top_block_channels=4096,
        layers_per_block=[2, 2, 2, 2, 2, 24], head_dim=64, rope=True, pt_seq_len=32, sos=True,
        txt_size=256, txt_dim=2048, cond_top_only=True, use_softplus=True, use_final_norm=True,
        soft_clip=4.0, seq_order="L2R", temporal_causal=2, shallow_block_local=True,
        learnable_self_denoiser=True, conditional_denoiser=True, denoiser_window=10,
        noise_std=0.5, cfg=2.5, vae="Wan-AI/Wan2.2-TI2V-5B-Diffusers", text="google/flan-t5-xl",
    ),
    # The video benchmark's model: bench-256's widths on 8x8-token frames, STARFlow-V options.
    "bench-video": dict(
        channel_size=4, img_size=8, patch_size=1, channels=256, layers_per_block=[1, 1, 4],
        head_dim=64, rope=True, sos=True, txt_size=16, txt_dim=64, cond_top_only=True,
        use_softplus=True, use_final_norm=True, soft_clip=4.0, seq_order="L2R", temporal_causal=1,
        shallow_block_local=True,
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
    except (TypeError, ValueError, IndexError, OverflowError):
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


def config_from_dict(options: Any, source: str = "config", strict: bool = False) -> StarFlowConfig:
    """Typed config from a flat mapping. Keys that are not model options go to `extra`, or,
    with `strict`, are refused naming the nearest known keys (a typo)."""
    if not isinstance(options, dict):
        raise StarflowError(f"{source}: expected a mapping of config keys, got {type(options).__name__}")
    known, extra = {}, {}
    for key, value in options.items():
        if key in _FIELDS:
            try:
                known[key] = _coerce(key, value)
            except StarflowError as err:
                raise StarflowError(f"{source}: {err}") from None
        elif strict:
            near = difflib.get_close_matches(str(key), _FIELDS, n=3)
            hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
            raise StarflowError(
                f"{source}: unknown config key {key!r}{hint} (other settings go under 'extra:')"
            )
        else:
            extra[key] = value
    try:
        return StarFlowConfig(**known, extra=extra)
    except (StarflowError, TypeError) as err:
        raise StarflowError(f"{source}: {err}") from None


def load_config(path_or_preset: str | Path) -> StarFlowConfig:
    """Read a preset name (see PRESETS), an official YAML (`arguments:`) or ours (`model:`)."""
    name = str(path_or_preset)
    if name in PRESETS:
        return config_from_dict(PRESETS[name], source=f"preset {name!r}")
    path = Path(name)
    if not path.is_file():
        raise StarflowError(f"config {name!r}: no such file and not a preset; presets are {sorted(PRESETS)}")
    document = read_yaml(path, "config")
    source = f"config {path}"
    if isinstance(document, dict) and isinstance(document.get("arguments"), list):
        options: dict[str, Any] = {}
        for item in document["arguments"]:
            if not isinstance(item, dict):
                raise StarflowError(
                    f"{source}: every item under 'arguments:' must be 'key: value', got {item!r}"
                )
            options.update(item)
        return config_from_dict(options, source)
    if isinstance(document, dict) and isinstance(document.get("model"), dict):
        extra = document.get("extra") or {}
        if not isinstance(extra, dict):
            raise StarflowError(f"{source}: 'extra:' must be a mapping, got {type(extra).__name__}")
        config = config_from_dict(document["model"], source, strict=True)
        return dataclasses.replace(config, extra=dict(extra))
    raise StarflowError(f"{source}: expected an official 'arguments:' list or a 'model:' mapping")


def save_config(config: StarFlowConfig, path: str | Path) -> None:
    """Write our YAML form (`model:` mapping, the other settings under `extra:`)."""
    options = {k: v for k, v in config.to_dict().items() if k != "extra"}
    document = {"model": options} | ({"extra": dict(config.extra)} if config.extra else {})
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(document, sort_keys=False))
