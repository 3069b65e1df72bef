"""The export's defaults, torch-free so that `starflow export onnx --help` prints them without
loading the exporter (the command line's options default to None and name these)."""

DEFAULT_OPSET = 20
SUPPORTED_OPSETS = range(18, 24)  # torch's exporter starts at 18; 23 is the newest it emits
DEFAULT_MAX_BATCH = 8  # most images per call; the graphs allow twice that rows (guidance)
DEFAULT_MAX_FRAMES = 16  # a video export's clips, unless max_frames says otherwise
DEFAULT_PRECISIONS = ("fp32", "fp16")
