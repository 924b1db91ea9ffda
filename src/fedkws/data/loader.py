"""Mini-batches straight from the memory-mapped cache.

No ``DataLoader`` workers: clients already run in parallel Ray actors on a
2-core budget, and gathering rows from a memory map is cheap. With a CUDA
``device`` the rows are gathered straight into pinned host memory and copied
asynchronously (``non_blocking``); on the CPU the batch is the gathered array
itself, no further copy.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from fedkws.data.augment import Augmenter
from fedkws.data.cache import CachedDataset
from fedkws.data.features import FeatureExtractor


def _rows(array: np.ndarray, idx: np.ndarray, pin: bool = False) -> torch.Tensor:
    # Sorted reads are sequential on disk; the order is restored afterwards.
    order = np.argsort(idx, kind="stable")
    shape = (len(idx),) + array.shape[1:]
    if pin:  # gathered into page-locked memory: the copy to the GPU can run asynchronously
        out = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        out.numpy()[order] = array[idx[order]]
        return out
    rows = np.empty(shape, dtype=np.float32)
    rows[order] = array[idx[order]]
    return torch.from_numpy(rows)


def to_device(batch: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """``batch`` on ``device``: itself on the CPU; on CUDA from pinned memory, ``non_blocking``."""
    if device is None or torch.device(device).type != "cuda":
        return batch
    if not batch.is_pinned():
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


def iterate_batches(
    data: CachedDataset,
    indices: np.ndarray,
    batch_size: int,
    generator: torch.Generator | None = None,
    shuffle: bool = False,
    augmenter: Augmenter | None = None,
    extractor: FeatureExtractor | None = None,
    drop_last: bool = False,
    device: torch.device | str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(features, labels)`` batches over ``indices``, on ``device`` (default: CPU).

    With an ``augmenter`` whose config needs waveforms, features are computed
    from augmented cached waveforms by ``extractor``; otherwise the cached
    features are used and only SpecAugment (if any) is applied. Augmentation
    runs on the CPU with ``generator``, so the batches are the same on every device.
    """
    pin = device is not None and torch.device(device).type == "cuda"
    indices = np.asarray(indices, dtype=np.int64)
    if shuffle:
        perm = torch.randperm(len(indices), generator=generator).numpy()
        indices = indices[perm]
    labels = torch.from_numpy(data.labels)
    stop = len(indices) - (len(indices) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = indices[start : start + batch_size]
        if len(idx) == 0:
            break
        if augmenter is not None and augmenter.config.needs_waves:
            if extractor is None:
                raise ValueError("waveform augmentation needs a feature extractor")
            feats = extractor(augmenter.waves(_rows(data.waves, idx), generator))
        else:
            feats = _rows(data.features, idx, pin and augmenter is None)
        if augmenter is not None:
            feats = augmenter.features(feats, generator)
        yield to_device(feats, device), to_device(labels[idx], device)
