"""libstarflow's sf_tensor_noise through ctypes (imported by test_noise.py; run as a script in a
process that preloads the sanitizer runtime to draw from an ASan + UBSan build):

    python noise_draw.py LIBSTARFLOW.so OUT.npz SEED:D0xD1x... [...]   (a scalar: SEED:)
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np


class NoiseError(Exception):
    """sf_tensor_noise returned a status: its message."""


def load(library: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library))
    lib.sf_tensor_noise.restype = ctypes.c_void_p
    lib.sf_tensor_noise.argtypes = [
        ctypes.c_uint64, ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p),
    ]  # fmt: skip
    lib.sf_status_message.restype = ctypes.c_char_p
    lib.sf_status_message.argtypes = [ctypes.c_void_p]
    lib.sf_status_free.argtypes = [ctypes.c_void_p]
    lib.sf_tensor_data.restype = ctypes.c_void_p
    lib.sf_tensor_data.argtypes = [ctypes.c_void_p]
    lib.sf_tensor_free.argtypes = [ctypes.c_void_p]
    return lib


def draw(lib: ctypes.CDLL, seed: int, shape: tuple[int, ...], *, null_shape: bool = False) -> np.ndarray:
    """sf_tensor_noise(seed, shape) as a float32 array (a copy); `null_shape` passes NULL for the
    shape with its rank (a bad input)."""
    dims = None if null_shape else (ctypes.c_int64 * max(len(shape), 1))(*shape)
    out = ctypes.c_void_p()
    status = lib.sf_tensor_noise(seed, dims, len(shape), ctypes.byref(out))
    if status:
        message = lib.sf_status_message(status).decode()
        lib.sf_status_free(status)
        raise NoiseError(message)
    try:
        count = int(np.prod(shape))
        data = ctypes.cast(lib.sf_tensor_data(out), ctypes.POINTER(ctypes.c_float))
        values = np.ctypeslib.as_array(data, (count,)).copy() if count else np.empty(0, np.float32)
        return values.reshape(shape)
    finally:
        lib.sf_tensor_free(out)


def main(argv: list[str]) -> None:
    lib = load(Path(argv[1]))
    arrays = {}
    for i, request in enumerate(argv[3:]):
        seed, dims = request.split(":")
        arrays[f"a{i}"] = draw(lib, int(seed), tuple(int(d) for d in dims.split("x") if d))
    np.savez(argv[2], **arrays)


if __name__ == "__main__":
    main(sys.argv)
