"""The self-denoise graph exported in a process of its own, beside the block graphs.

The denoise graph is the longest single step of an export (a forward+backward trace through
every block; ~90 s of the embedded model's ~150 s on one core), and tracing is single-threaded
Python: with a spare core, `export_onnx` starts it here first and exports the block graphs
meanwhile. A plain child process (`python -m starflow.export.worker`) with its own arguments:
spawn would re-import the parent's `__main__` (a user's script), fork would copy a process whose
OpenMP pool is not fork-safe.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from starflow.core.errors import StarflowError


class DenoiseJob:
    """The denoise graph of a checkpoint's model exported (and validated) into `directory`, in a
    child process."""

    def __init__(self, checkpoint: Path, config: str | Path | None, directory: Path, opset: int):
        self._log = tempfile.TemporaryFile()  # not a pipe: a chatty child must not block on it
        command = [
            sys.executable,
            "-m",
            "starflow.export.worker",
            str(checkpoint),
            str(directory),
            str(opset),
        ]
        command += ["--config", str(config)] if config is not None else []
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self._log)

    def wait(self) -> None:
        """Block until the graph is written and validated; a failure there is raised here."""
        code = self._process.wait()
        self._log.seek(0)
        log = self._log.read().decode(errors="replace").strip().splitlines()
        self._log.close()
        if code != 0:
            why = log[-1] if log else f"the worker process exited with status {code}"
            raise StarflowError(f"export of graph denoise.fp32 (worker process) failed: {why}")

    def cancel(self) -> None:
        """Stop the child (the export failed elsewhere); a no-op once it has finished."""
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        if not self._log.closed:
            self._log.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export (and validate) one model's denoise graph.")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("directory", type=Path)
    parser.add_argument("opset", type=int)
    parser.add_argument("--config")
    args = parser.parse_args(argv)
    import torch

    from starflow.export.components import export_component
    from starflow.export.denoise import denoise_graph
    from starflow.model.checkpoint import load_model

    torch.set_num_threads(1)  # the parent keeps the other core
    try:
        export_component(denoise_graph(load_model(args.config, args.checkpoint)), args.directory, args.opset)
    except StarflowError as err:
        print(err, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
