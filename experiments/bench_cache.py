"""Benchmark: one training epoch's input pipeline, three ways, side by side.

    .venv/bin/python experiments/bench_cache.py \
        [--dataset-root data/synthetic-spk360-ho60-utt2-unk3-seed0]

(a) cached features from the memory map (no augmentation),
(a') cached waveforms + feature extraction (the cost of computing features),
(b) cached waveforms + waveform augmentation + feature extraction (augment=full),
(c) decoding every WAV again and computing features (what the cache avoids).

Prints seconds per epoch and the ratios to (a), all measured in one run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fedkws.data.audio import read_clip
from fedkws.data.augment import AugmentConfig, Augmenter
from fedkws.data.cache import DataConfig, prepare
from fedkws.data.features import FeatureConfig, FeatureExtractor
from fedkws.data.loader import iterate_batches
from fedkws.errors import user_errors


def _epoch(batches) -> float:
    start = time.perf_counter()
    n = 0
    for x, _ in batches:
        n += len(x)
    return time.perf_counter() - start


def main() -> None:
    """Run the three pipelines over the training split and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset-root", default="data/synthetic-spk360-ho60-utt2-unk3-seed0")
    parser.add_argument("--cache-dir", default="data/cache")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: must be >= 1")
    torch.set_num_threads(1)  # what one client actor gets

    with user_errors():  # no dataset there, a cache folder that cannot be made: one line
        data = prepare(DataConfig(root=args.dataset_root), FeatureConfig(), args.cache_dir)
    rows = data.split_indices("training")
    gen = torch.Generator().manual_seed(0)
    extractor = FeatureExtractor(FeatureConfig())
    augmenter = Augmenter(
        AugmentConfig(time_shift_ms=100, noise_prob=0.8, speed_prob=0.5, time_masks=2,
                      freq_masks=2),
        data.noise_bank(),
    )  # fmt: skip

    t_features = _epoch(iterate_batches(data, rows, args.batch_size, gen, shuffle=True))
    t_extract = _epoch(
        (extractor(torch.from_numpy(np.asarray(data.waves[rows[i : i + args.batch_size]]))), None)
        for i in range(0, len(rows), args.batch_size)
    )
    t_augment = _epoch(
        iterate_batches(data, rows, args.batch_size, gen, shuffle=True, augmenter=augmenter,
                        extractor=extractor)
    )  # fmt: skip

    root = Path(args.dataset_root)
    paths = [p for p in data.paths[rows] if p]

    def decoded():
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start : start + args.batch_size]
            waves = torch.from_numpy(np.stack([read_clip(root / p) for p in chunk]))
            yield extractor(waves), None

    t_decode = _epoch(decoded())
    print(f"training split: {len(rows)} examples ({len(paths)} from WAV files)")
    print(f"{'pipeline':<48}{'s/epoch':>10}{'x (a)':>8}")
    for name, t in (
        ("(a) cached features (memory map)", t_features),
        ("(a') cached waves + features, no augmentation", t_extract),
        ("(b) cached waves + augmentation + features", t_augment),
        ("(c) decode WAVs + features, every epoch", t_decode),
    ):
        print(f"{name:<48}{t:>10.3f}{t / t_features:>8.1f}")


if __name__ == "__main__":
    main()
