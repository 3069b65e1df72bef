"""The standalone runtime: numpy + ONNX Runtime orchestration of an export (never imports torch)."""

from starflow.core.generation import Generation
from starflow.core.sampler import BlockStats, JacobiSettings, SampleOptions
from starflow.runtime.generator import Generator
from starflow.runtime.pipeline import Pipeline

__all__ = ["BlockStats", "Generation", "Generator", "JacobiSettings", "Pipeline", "SampleOptions"]
