"""From a dataset config to an opened feature cache.

This is the only place that decides whether a dataset must be generated
(embedded synthetic corpus) or downloaded (real Speech Commands) before it is
read. Builders take plain arguments; the config is unpacked here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from fedkws.data.augment import AugmentConfig
from fedkws.data.cache import CachedDataset, DataConfig, prepare
from fedkws.data.errors import DataError, DatasetNotFoundError, check_folder
from fedkws.data.features import FeatureConfig
from fedkws.fileio import file_lock

log = logging.getLogger(__name__)


def _pick(cls: type, values: Mapping[str, Any], **extra: Any) -> Any:
    """Instantiate a dataclass from the matching keys of a mapping (lists become tuples)."""
    names = {f.name for f in fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
    kwargs.update(extra)
    return cls(**kwargs)


def feature_config(features: Mapping[str, Any]) -> FeatureConfig:
    """``FeatureConfig`` from the ``features`` config group."""
    return _pick(FeatureConfig, features)


def augment_config(augment: Mapping[str, Any]) -> AugmentConfig:
    """``AugmentConfig`` from the ``augment`` config group."""
    return _pick(AugmentConfig, augment)


def data_config(dataset: Mapping[str, Any]) -> DataConfig:
    """``DataConfig`` from the ``dataset`` config group."""
    return _pick(DataConfig, dataset, seed=int(dataset.get("split_seed", 0)))


def _extracted_by_hand(root: Path) -> bool:
    """Whether ``root`` holds word folders that no interrupted download left behind."""
    from fedkws.data import download as dl
    from fedkws.data.speech_commands import has_word_folders

    return not (root / dl.INCOMPLETE_NAME).exists() and has_word_folders(root)


def needs_generating(root: Path | str, generate: Mapping[str, Any] | None) -> bool:
    """Whether :func:`ensure_dataset` would generate the synthetic dataset at ``root``."""
    if generate is None:
        return False
    from fedkws.data import synth

    return not synth.is_complete(root, **synth.config_params(generate))


def ensure_dataset(
    root: Path | str,
    generate: Mapping[str, Any] | None = None,
    download: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Make sure a complete dataset sits at ``root``: generate or download it if not.

    Safe when several processes ask for the same ``root`` at once: one of
    them generates or downloads it (under a lock file beside ``root``), the
    others wait and then use it.

    Raises
    ------
    DatasetNotFoundError
        If ``root`` is missing and the config says neither how to generate nor
        how to download it.
    DataError
        If ``root`` (or a folder above it) is a file.
    """
    root = check_folder(root, "dataset.root")
    if generate is not None:
        from fedkws.data import synth

        params = synth.config_params(generate)
        if needs_generating(root, generate):
            root.parent.mkdir(parents=True, exist_ok=True)
            with file_lock(synth.lock_path(root)):
                # Another process may have generated it while this one waited.
                if not synth.is_complete(root, **params):
                    _refuse_other_dataset(root, synth.other_settings(root, **params))
                    log.info("generating the synthetic dataset at %s", root)
                    try:
                        summary = synth.generate(root, progress=progress, **params)
                    except FileExistsError as err:  # a folder of other files: not written into
                        raise DataError(f"dataset.root={root}: {err}") from None
                    log.info("%s", summary.describe())
        return root
    if download is not None:
        _ensure_downloaded(root, download, progress)
        return root
    if not root.is_dir():
        # Let the loader produce its standard message naming both commands.
        from fedkws.data.speech_commands import scan_words

        scan_words(root)
    return root


def _ensure_downloaded(root: Path, download: Mapping[str, Any], progress: bool) -> None:
    """The real dataset at ``root``, whichever way it comes.

    fedkws' complete download (of this version), a copy extracted by hand (used as
    it is), or downloaded now.
    """
    from fedkws.data import download as dl

    version = download.get("version", "v0.02")
    if dl.is_complete(root):
        dl.check_complete(root, version, download.get("sha256"))
    elif _extracted_by_hand(root):
        log.info(
            "%s holds an extracted Speech Commands dataset without fedkws' download "
            "marker; using it as it is (nothing is downloaded)",
            root,
        )
    else:
        dl.download_speech_commands(
            root,
            version=version,
            url=download.get("url"),
            sha256=download.get("sha256"),
            progress=progress,
        )


def _refuse_other_dataset(root: Path, differences: list[str] | None) -> None:
    """A finished synthetic dataset of other settings is kept, never generated over."""
    if differences:
        raise DataError(
            f"dataset.root={root} holds a synthetic dataset generated with other settings "
            f"({'; '.join(differences)}): give the settings it has to use it, set "
            "dataset.root to a folder of its own for these (the default root is named "
            "after every setting but noise_seconds), or delete that folder to generate it again"
        )


def load_dataset(
    dataset: Mapping[str, Any],
    features: Mapping[str, Any],
    cache_dir: Path | str,
    progress: bool = True,
) -> CachedDataset:
    """Generate/download if needed, then build or reuse the memory-mapped cache."""
    return open_dataset(
        data_config(dataset),
        feature_config(features),
        cache_dir,
        dataset.get("generate"),
        dataset.get("download"),
        progress,
    )


def open_dataset(
    data: DataConfig,
    features: FeatureConfig,
    cache_dir: Path | str,
    generate: Mapping[str, Any] | None = None,
    download: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> CachedDataset:
    """:func:`ensure_dataset` at ``data.root``, then the cache entry for ``features``."""
    ensure_dataset(data.root, generate, download, progress)
    return prepare(data, features, cache_dir, progress=progress)


__all__ = [
    "DataError",
    "DatasetNotFoundError",
    "augment_config",
    "data_config",
    "ensure_dataset",
    "feature_config",
    "load_dataset",
    "open_dataset",
]
