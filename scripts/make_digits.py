"""Write starflow/assets/digits.npz from scikit-learn's bundled 8x8 digits (run once; not at run time).

The package ships the array so that training and the demo need no download and no scikit-learn.
"""

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parents[1] / "starflow" / "assets" / "digits.npz"

if __name__ == "__main__":
    digits = load_digits()
    images = digits.images.astype(np.uint8)  # (1797, 8, 8), values 0..16
    labels = digits.target.astype(np.uint8)  # (1797,)
    np.savez_compressed(OUT, images=images, labels=labels)
    print(f"wrote {OUT}: images {images.shape} max {images.max()}, labels {np.bincount(labels)}")
