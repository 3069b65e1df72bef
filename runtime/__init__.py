"""The standalone runtime: numpy + ONNX Runtime orchestration of an export (never imports torch)."""

from starflow.runtime.generator import Generation, Generator
from starflow.runtime.pipeline import Pipeline
from starflow.sampler import BlockStats, JacobiSettings, SampleOptions

__all__ = ["BlockStats", "Generation", "Generator", "JacobiSettings", "Pipeline", "SampleOptions"]
