"""TensorRT optimization profiles and engine cache keys, derived from the manifest (no TensorRT).

Profiles come from the export's symbolic dims: `default` is the exported range, `sequential`
fixes chunk 1, `jacobi` covers chunks up to the Jacobi block, and a grid bucket fixes the
token count of one resolution. The cache key hashes everything an engine depends on, so a
changed graph, profile, builder or target rebuilds exactly the engines it touches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence

from starflow.contract.manifest import EngineProfile, Graph, Latent, Range
from starflow.core.checks import check_count
from starflow.core.errors import StarflowError

PROFILE_KINDS = ("default", "sequential", "jacobi")


def derive_profiles(
    dims: dict[str, Range],
    latent: Latent,
    jacobi_chunk: int,
    kinds: Sequence[str] = ("default",),
    grids: Sequence[tuple[int, int]] = (),
    batch: Range | None = None,
) -> list[EngineProfile]:
    """Directory-wide profiles from an export's dims: named kinds, then one per token grid.

    default: the exported ranges; sequential: chunk 1; jacobi: chunks up to `jacobi_chunk`
    (1..c, tuned for c); grid HxW: one resolution bucket, tokens = H*W and chunk/past sized for
    it. `batch` replaces every profile's batch range and must lie inside the exported one.
    """
    unknown = [k for k in kinds if k not in PROFILE_KINDS]
    if unknown:
        raise StarflowError(f"profiles {unknown}: choose from {list(PROFILE_KINDS)} (and grids HxW)")
    if batch is not None:
        exported = dims["batch"]
        if not (exported.min <= batch.min <= batch.opt <= batch.max <= exported.max):
            raise StarflowError(
                f"batch {batch.min}:{batch.opt}:{batch.max}: "
                f"the graphs allow rows {exported.min}..{exported.max}"
            )
        dims = {**dims, "batch": batch}
    check_count(jacobi_chunk, "jacobi_chunk")
    c = min(jacobi_chunk, dims["chunk"].max)
    profiles = []
    for kind in dict.fromkeys(kinds):
        chunk = {"default": dims["chunk"], "sequential": Range(1, 1, 1), "jacobi": Range(1, c, c)}[kind]
        profiles.append(EngineProfile(kind, {**dims, "chunk": chunk}))
    p = latent.patch_size
    lo, hi = (latent.min[0] // p, latent.min[1] // p), (latent.max[0] // p, latent.max[1] // p)
    text = dims["text"].max if "text" in dims else 0
    for h, w in dict.fromkeys(grids):
        if not (lo[0] <= h <= hi[0] and lo[1] <= w <= hi[1]):
            raise StarflowError(
                f"grid {h}x{w}: this export covers token grids {lo[0]}x{lo[1]} .. {hi[0]}x{hi[1]} "
                f"(latent {latent.describe_range()} at patch size {p})"
            )
        t = h * w
        past = Range(dims["past"].min, text + t // 2, text + t - 1)
        grid_dims = {**dims, "tokens": Range(t, t, t), "chunk": Range(1, min(c, t), t), "past": past}
        profiles.append(EngineProfile(f"grid {h}x{w}", grid_dims))
    if not profiles:
        raise StarflowError("no profiles: name at least one profile kind or grid")
    return profiles


def graph_profiles(graph: Graph, profiles: Sequence[EngineProfile]) -> list[EngineProfile]:
    """The profiles restricted to one graph's dims, duplicates dropped (first name kept)."""
    out: list[EngineProfile] = []
    for profile in profiles:
        mine = EngineProfile(profile.name, {d: profile.dims[d] for d in graph.profile})
        if all(mine.dims != seen.dims for seen in out):
            out.append(mine)
    return out


def input_shapes(graph: Graph, profile: EngineProfile) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """Input name -> (min, opt, max) shapes, the symbolic dims replaced by the profile's."""

    def shape(t, field: str) -> list[int]:
        return [getattr(profile.dims[d], field) if isinstance(d, str) else d for d in t.shape]

    return {t.name: (shape(t, "min"), shape(t, "opt"), shape(t, "max")) for t in graph.inputs}


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    """Everything besides the graph and profiles that an engine depends on."""

    builder: str
    version: str
    compute_capabilities: tuple[str, ...]
    device: str | None
    optimization_level: int
    workspace_bytes: int | None


def cache_key(graph: Graph, profiles: Sequence[EngineProfile], settings: BuildSettings) -> str:
    """sha256 over the engine's inputs; any change to them makes a new key."""
    material = {
        "onnx": [graph.sha256, *(e.sha256 for e in graph.external_data)],
        "precision": graph.precision,
        "profiles": [dataclasses.asdict(p) for p in profiles],
        "settings": dataclasses.asdict(settings),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
