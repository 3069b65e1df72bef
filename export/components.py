"""The pipeline around the flow: text encoder, VAE decoder and (self- or learned) denoise graphs.

They are loaded (local directories only) and checked against the flow before anything is
written, then exported and validated against PyTorch one by one (a miss fails the export).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starflow.contract.manifest import VAE_SCALE, Decoder, Denoise, TextComponent
from starflow.core.errors import StarflowError
from starflow.export.graphs import GraphSpec
from starflow.model.flow import StarFlow

if TYPE_CHECKING:
    from starflow.export.worker import DenoiseJob


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
    """The components of one export, loaded and checked against the flow."""

    text_encoder: Any  # HFTextEncoder | LabelTextEncoder | None
    vae: Any  # diffusers AutoencoderKL | None
    vae_source: str | None
    denoise: bool

    @classmethod
    def load(
        cls, model: StarFlow, checkpoint: Path, text_encoder: Path | None, vae: Path | None, denoise: bool
    ) -> Components:
        """The text encoder (a local HF directory, or the label table saved beside a class-conditional
        checkpoint) and the VAE (a local diffusers directory), checked to fit the flow."""
        from starflow.model.label_encoder import labels_path, load_label_encoder

        config = model.config
        encoder = None
        if text_encoder is not None:
            if config.txt_dim == 0:
                raise StarflowError(f"text_encoder {text_encoder}: this model is not text-conditioned")
            from starflow.model.text_encoder import HFTextEncoder

            encoder = HFTextEncoder.from_directory(Path(text_encoder), config.txt_size)
            encoder.check_dim(config.txt_dim)
        elif config.txt_dim > 0 and labels_path(checkpoint).is_file():
            from starflow.model.text_encoder import LabelTextEncoder

            table = load_label_encoder(labels_path(checkpoint), config.txt_size, config.txt_dim)
            encoder = LabelTextEncoder(table)
        loaded_vae = None
        if vae is not None:
            if config.vae is None:
                raise StarflowError(f"vae {vae}: this is a pixel-space model (its config names no VAE)")
            from starflow.model.vae import check_channels, load_vae

            loaded_vae = load_vae(Path(vae))
            check_channels(loaded_vae, config.channel_size)
        return cls(encoder, loaded_vae, Path(vae).name if vae is not None else None, denoise)

    def pending(self) -> list[str]:
        """The graphs `export` writes, in order (the denoise graph may come from a `DenoiseJob`)."""
        names = ["text_encoder"] if self.text_encoder is not None else []
        names += ["decoder"] if self.vae is not None else []
        return names + (["denoise"] if self.denoise else [])

    def export(
        self,
        model: StarFlow,
        work: Path,
        opset: int,
        progress: Callable[[str], None],
        denoise_job: DenoiseJob | None = None,
    ) -> ComponentEntries:
        """Export (and validate: each exporter checks its graph against PyTorch) every component;
        the denoise graph is waited for when `denoise_job` already exports it."""
        entries = ComponentEntries()
        for name in self.pending():
            progress(f"{'wait for' if denoise_job and name == 'denoise' else 'export'} {name}")
            if name == "text_encoder":
                from starflow.export.text_encoder import export_text_encoder

                spec, entries.text = export_text_encoder(self.text_encoder, work, opset)
                entries.files.append(entries.text.tokenizer)
            elif name == "decoder":
                from starflow.export.decoder import export_decoder
                from starflow.model.vae import upsampling

                spec = export_decoder(self.vae, work / "decoder.fp32.onnx", VAE_SCALE, opset)
                entries.decoder = Decoder(
                    "sd-vae", self.vae_source, VAE_SCALE, spec.name, upsampling(self.vae)
                )
            elif model.learnable_self_denoiser is not None:
                from starflow.export.denoise import export_learned_denoise, learned_spec
                from starflow.model.flow import LEARNED_DENOISER_STEP

                spec = export_learned_denoise(model, work / learned_spec(model).file, opset)
                config = model.config
                entries.denoise = Denoise(
                    "learned", spec.name, config.noise_std, LEARNED_DENOISER_STEP, config.denoiser_window
                )
            else:
                from starflow.export.denoise import denoise_spec, export_denoise

                spec = denoise_spec(model)
                if denoise_job is None:
                    export_denoise(model, work / spec.file, opset)
                else:
                    denoise_job.wait()
                entries.denoise = Denoise("nll-gradient", spec.name, model.config.noise_std)
            entries.graphs.append(spec)
        config = model.config
        if self.vae is None and config.vae:  # named by the config, but not given: no graph
            entries.decoder = Decoder(
                "sd-vae", config.vae, VAE_SCALE, None, config.img_size // config.latent_size
            )
        return entries
