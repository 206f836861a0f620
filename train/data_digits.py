"""scikit-learn's handwritten digits (1797 images of 8x8 pixels, 16 grey levels), split and scaled.

The data ship inside scikit-learn (``sklearn.datasets.load_digits``), so nothing is downloaded.
"""

from __future__ import annotations

import functools

import torch

N_CLASSES = 10
IMAGE_SIZE = 8


@functools.lru_cache(maxsize=1)  # parsing the bundled file takes a second or two
def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All images ``(1797, 1, 8, 8)`` float32 in [0, 1] and labels ``(1797,)`` int64 (cached:
    index them, do not modify them in place)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise RuntimeError("the digits data come with scikit-learn: pip install scikit-learn") from exc
    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.as_tensor(data.target, dtype=torch.int64)


def digits_splits(test_size: int, seed: int,
                  train_size: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train": (x, y), "test": (x, y)}``: a seeded permutation, ``test_size`` images held out.

    ``train_size`` > 0 keeps only that many training images (0: all the rest). Pixels are
    standardized with the training images' mean and standard deviation (one of each).
    """
    images, labels = load_digits_tensors()
    n = images.shape[0]
    if not 0 < test_size < n:
        raise ValueError(f"test_size must be in 1..{n - 1}, got {test_size}")
    if train_size < 0 or train_size > n - test_size:
        raise ValueError(f"train_size must be in 0..{n - test_size} (0: all), got {train_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test, train = perm[:test_size], perm[test_size:]
    if train_size:
        train = train[:train_size]
    mean, std = images[train].mean(), images[train].std()
    scale = lambda idx: (images[idx] - mean) / std  # noqa: E731
    return {"train": (scale(train), labels[train]), "test": (scale(test), labels[test])}
