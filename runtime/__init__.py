"""numpy + onnxruntime sampling orchestrator, never imports torch (not built yet)."""
