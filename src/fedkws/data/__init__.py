"""Data layer: Speech Commands loading, synthetic dataset, features, augmentation, partitions."""
