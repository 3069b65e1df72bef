"""The pipeline around the flow: text encoder, VAE decoder and the learned denoiser's graph (the
self-denoise needs no graph of its own: it chains the blocks' vjp graphs).

Each component declares its graph in a file of its own (text_encoder.py, decoder.py,
denoise.py) as a `ComponentGraph`; `export_component` exports any of them and validates it
through the runtime's Runner against PyTorch (a miss fails the export). They are loaded (local
directories only) and checked against the flow before anything is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from starflow.contract.manifest import VAE_SCALE, Comparison, Decoder, Denoise, TextComponent
from starflow.export.defaults import DEFAULT_OPSET
from starflow.export.graphs import ComponentGraph, GraphSpec
from starflow.export.trace import (
    SHARED_WEIGHTS_BYTES,
    dynamic_shapes_of,
    export_module,
    named_tensors,
    trace_block,
    weight_bytes,
    write_block_graph,
)
from starflow.export.validate import check_results, compare
from starflow.model.flow import StarFlow
from starflow.runtime.backends import OrtRunner


def export_component(graph: ComponentGraph, directory: Path, opset: int = DEFAULT_OPSET) -> list[Comparison]:
    """Write `graph` (and its files) into `directory` and validate it; a miss raises, naming it.

    Through torch.export (`export_module`) where the graph needs it; the others are traced and
    written as the block graphs are (fake weights, then the module's own one tensor at a time,
    past SHARED_WEIGHTS_BYTES into a file of their own). Written in place: ONNX external data
    names its own file, so it cannot go through a temporary name; export_onnx works in a temporary
    directory anyway.
    """
    directory = Path(directory)
    spec, path = graph.spec, directory / graph.spec.file
    if graph.torch_export:
        export_module(graph.module, graph.example, dynamic_shapes_of(spec), spec, path, opset)
    else:
        (template,) = trace_block(graph.module, graph.example, spec, opset)
        shared = {} if weight_bytes(graph.module) > SHARED_WEIGHTS_BYTES else None
        write_block_graph(template, named_tensors(graph.module), spec, path, shared)
    for write in graph.files.values():
        write(directory)
    results = validate_component(graph, directory)
    check_results(results)
    return results


def validate_component(graph: ComponentGraph, directory: Path) -> list[Comparison]:
    """The exported graph in ONNX Runtime (inside its runtime wrapper, if any) against PyTorch, at
    every case; one Comparison per case and output."""
    spec = graph.spec
    runner = OrtRunner(spec.name, Path(directory) / spec.file, few_runs=True)
    run = graph.runtime(runner, Path(directory)) if graph.runtime is not None else runner.run
    results = []
    for case, feeds in graph.cases.items():
        actual, expected = run(feeds), graph.reference(feeds)
        results += [
            compare(spec.name, case, t.name, actual[t.name], expected[t.name], graph.tolerance)
            for t in spec.outputs
        ]
    return results


# where each kind of manifest entry goes in `ComponentEntries`
ENTRY_FIELDS = {TextComponent: "text", Decoder: "decoder", Denoise: "denoise"}


@dataclasses.dataclass
class ComponentEntries:
    """What the components add to the manifest."""

    text: TextComponent | None = None
    decoder: Decoder = Decoder("identity")
    denoise: Denoise | None = None
    graphs: list[GraphSpec] = dataclasses.field(default_factory=list)
    files: list[str] = dataclasses.field(default_factory=list)  # non-graph files, relative paths


@dataclasses.dataclass
class Components:
    """The component graphs of one export, loaded and checked against the flow, in export order."""

    graphs: list[ComponentGraph]
    gradient: Denoise | None = None  # the self-denoise, chained over the blocks' graphs

    @classmethod
    def load(
        cls, model: StarFlow, checkpoint: Path, text_encoder: Path | None, vae: Path | None, denoise: bool
    ) -> Components:
        """The text encoder (a local HF directory, or the label table saved beside a class-conditional
        checkpoint), the VAE (a local diffusers directory) and the denoiser, checked to fit."""
        from starflow.export.decoder import decoder_graph
        from starflow.export.denoise import learned_graph
        from starflow.export.text_encoder import text_encoder_graph
        from starflow.model.text_encoder import text_encoder_for
        from starflow.model.vae import vae_for

        graphs = []
        encoder = text_encoder_for(model.config, checkpoint, text_encoder)
        if encoder is not None:
            graphs.append(text_encoder_graph(encoder))
        loaded_vae = vae_for(model.config, vae)
        if loaded_vae is not None:
            graphs.append(decoder_graph(loaded_vae, VAE_SCALE, Path(vae).name))
        gradient = None
        if denoise and model.learnable_self_denoiser is not None:
            graphs.append(learned_graph(model))
        elif denoise:
            gradient = Denoise("nll-gradient", None, model.config.noise_std)
        return cls(graphs, gradient)

    def pending(self) -> list[str]:
        """The graphs `export` writes, in order."""
        return [g.spec.kind for g in self.graphs]

    def export(
        self, model: StarFlow, work: Path, opset: int, progress: Callable[[str], None]
    ) -> ComponentEntries:
        """Export and validate every component."""
        entries = ComponentEntries(denoise=self.gradient)
        for graph in self.graphs:
            progress(f"export {graph.spec.kind}")
            export_component(graph, work, opset)
            setattr(entries, ENTRY_FIELDS[type(graph.entry)], graph.entry)
            entries.graphs.append(graph.spec)
            entries.files += list(graph.files)
        config = model.config
        if entries.decoder.graph is None and config.vae:  # named by the config, but not given: no graph
            entries.decoder = Decoder(
                "sd-vae", config.vae, VAE_SCALE, None, config.img_size // config.latent_size
            )
        return entries
