"""Feature pipeline: the cached batches a training epoch reads vs per-clip librosa.

Both sides turn the same clips of the default embedded dataset into augmented
log-mel features (time shift up to 100 ms, background noise on 80 % of clips at
volume up to 0.1: ``augment=default``; 40 mel bands, n_fft 512, 30 ms window,
10 ms hop: ``features=logmel``):

- cached: :func:`fedkws.data.loader.iterate_batches` over the memory-mapped
  waveform cache with the :class:`~fedkws.data.augment.Augmenter` and feature
  extractor of :func:`fedkws.core.loops.training_augmentation`, in batches of
  ``train.batch_size``, shuffled: exactly what a client's epoch reads;
- librosa: per clip, read the WAV with soundfile, the same augmentation in
  NumPy, ``librosa.feature.melspectrogram`` with the same parameters, log.

A third side, ``augment.domain=mel``, reads the cached log-mel features and
applies the shift (whole frames) and the noise (as mel power) to them, with no
STFT per epoch: its own ratio, and how far its features are from the exact
waveform ones on the same clips, shifts and noise (the NOTES).

Single thread for all (``torch.set_num_threads(1)`` and BLAS/OpenMP pools
limited to one thread), best of ``--pipeline-repeats`` passes each, the passes
interleaved so every side sees the same machine load.
"""

from __future__ import annotations

import time

import common
from common import Ratio

TITLE = "feature pipeline, clips/s: cached augmented batches vs per-clip librosa"
TARGET = 10.0
NOTES = ""  # filled by run(): the stage-by-stage breakdown


def add_arguments(group) -> None:
    """``--pipeline-clips``, ``--pipeline-repeats``."""
    group.add_argument(
        "--pipeline-clips", type=common.at_least(1), default=1000, help="clips per pass"
    )
    group.add_argument(
        "--pipeline-repeats", type=common.at_least(1), default=3, help="timed passes per side"
    )


def _setup(clips: int):
    import numpy as np

    from fedkws.core.loops import training_augmentation
    from fedkws.recipes.common import load_data

    spec = common.run_spec(["augment=default", "logger=disabled", "progress=false"])
    common.progress("pipeline", "opening the default dataset (generated on first use)")
    data = load_data(spec)
    rows = data.split_indices("training")
    rows = rows[data.paths[rows] != ""]  # clips with a WAV file (not silence slices)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(rows, size=min(clips, len(rows)), replace=False))
    augmenter, extractor = training_augmentation(spec.augment, spec.features, data)
    mel_spec = common.run_spec(
        ["augment=default", "augment.domain=mel", "logger=disabled", "progress=false"]
    )
    start = time.perf_counter()
    mel_augmenter, _ = training_augmentation(mel_spec.augment, mel_spec.features, data)
    mel_setup_s = time.perf_counter() - start  # the noise bank's mel power, once a process
    return spec, data, rows, augmenter, extractor, mel_augmenter, mel_setup_s


def _cached_pass(spec, data, rows, augmenter, extractor, seed: int) -> tuple[float, int]:
    import torch

    from fedkws.data.loader import iterate_batches

    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    seen = 0
    for feats, _ in iterate_batches(
        data,
        rows,
        spec.train.batch_size,
        gen,
        shuffle=True,
        augmenter=augmenter,
        extractor=extractor,
    ):
        seen += len(feats)
    return time.perf_counter() - start, seen


class LibrosaPipeline:
    """Per clip: decode, time shift, noise mix, mel spectrogram, log (NumPy/librosa)."""

    def __init__(self, spec, data) -> None:
        import numpy as np

        from fedkws.data.audio import CLIP_SAMPLES, SAMPLE_RATE

        self.root = data.manifest["root"]
        self.noise = np.asarray(data.noise, dtype=np.float32)  # loaded once, as any pipeline
        self.features = spec.features
        self.augment = spec.augment
        self.length, self.rate = CLIP_SAMPLES, SAMPLE_RATE

    def read(self, rel_path: str):
        """Decode one WAV file, padded or cut to one second."""
        import numpy as np
        import soundfile as sf

        y, _ = sf.read(f"{self.root}/{rel_path}", dtype="float32")
        return np.pad(y[: self.length], (0, max(0, self.length - len(y))))

    def shift_and_noise(self, y, rng):
        """Random time shift (zero-filled), then background noise on ``noise_prob`` of clips."""
        import numpy as np

        a = self.augment
        limit = round(self.rate * a.time_shift_ms / 1000)
        shift = int(rng.integers(-limit, limit + 1))
        shifted = np.zeros_like(y)
        if shift >= 0:
            shifted[shift:] = y[: self.length - shift]
        else:
            shifted[:shift] = y[-shift:]
        if rng.random() >= a.noise_prob:
            return shifted
        start = int(rng.integers(0, len(self.noise) - self.length + 1))
        volume = rng.uniform(*a.noise_volume)
        return np.clip(shifted + volume * self.noise[start : start + self.length], -1.0, 1.0)

    def melspectrogram(self, y):
        """``librosa.feature.melspectrogram`` with the parameters of ``features=logmel``."""
        import librosa

        f = self.features
        return librosa.feature.melspectrogram(
            y=y,
            sr=self.rate,
            n_fft=f.n_fft,
            hop_length=f.hop_length,
            win_length=f.win_length,
            window="hann",
            center=True,
            pad_mode="reflect",
            power=2.0,
            n_mels=f.n_mels,
            fmin=f.f_min,
            fmax=f.f_max,
            htk=False,
            norm="slaney",
        )

    def log(self, mel):
        """Natural log with the feature config's offset."""
        import numpy as np

        return np.log(mel + self.features.log_offset)

    def clip(self, rel_path: str, rng, augment: bool = True):
        """Log-mel features ``(bins, frames)`` of one clip."""
        y = self.read(rel_path)
        if augment:
            y = self.shift_and_noise(y, rng)
        return self.log(self.melspectrogram(y))

    def run(self, paths, seed: int) -> tuple[float, int]:
        """Seconds and clips of one pass over ``paths``."""
        import numpy as np

        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        for path in paths:
            self.clip(path, rng)
        return time.perf_counter() - start, len(paths)


def _agreement(data, rows, extractor, pipe: LibrosaPipeline) -> float:
    """Largest |difference| of un-augmented log-mels between the two front ends."""
    import numpy as np
    import torch

    idx = rows[:8]
    ours = extractor(torch.from_numpy(np.array(data.waves[idx])))[:, 0].numpy()
    theirs = np.stack([pipe.clip(p, None, augment=False) for p in data.paths[idx]])
    return float(np.abs(ours - theirs).max())


def _cached_stages(spec, data, rows, augmenter, extractor) -> dict[str, float]:
    """Seconds per stage of one cached pass, stage by stage as the loader runs them."""
    import torch

    from fedkws.data import augment as A
    from fedkws.data.loader import _rows

    a, gen = spec.augment, torch.Generator().manual_seed(7)
    shift = round(extractor.config.sample_rate * a.time_shift_ms / 1000)
    stages = {
        "gather rows (memory map)": lambda idx, _: _rows(data.waves, idx),
        "time shift": lambda _, w: A.time_shift(w, shift, gen),
        "noise mix": lambda _, w: A.mix_noise(
            w, augmenter.noise_bank, a.noise_prob, a.noise_volume, a.noise_snr_db, gen
        ),
        "STFT (torch.stft)": lambda _, w: extractor.stft(w),
        "power spectrum (hypot(re, im)²)": lambda _, spec_: extractor.power(spec_),
        "mel filterbank + log": lambda _, power: extractor.log_mel(power),
    }
    return _timed_stages(
        stages,
        [rows[i : i + spec.train.batch_size] for i in range(0, len(rows), spec.train.batch_size)],
    )


def _mel_stages(spec, data, rows, augmenter) -> dict[str, float]:
    """Seconds per stage of one ``augment.domain=mel`` pass."""
    import math

    import torch

    from fedkws.data import augment as A
    from fedkws.data.loader import _rows

    a, fc, gen = spec.augment, augmenter.feature_config, torch.Generator().manual_seed(7)
    stages = {
        "gather rows (memory map)": lambda idx, _: _rows(data.features, idx),
        "frame shift": lambda _, f: A.shift_frames(
            f, round(a.time_shift_ms / fc.hop_ms), math.log(fc.log_offset), gen
        ),
        "noise mix (mel power)": lambda _, f: A.mix_noise_mel(
            f,
            augmenter.noise_power,
            a.noise_prob,
            a.noise_volume,
            a.noise_snr_db,
            fc.log_offset,
            gen,
        ),  # fmt: skip
    }
    return _timed_stages(
        stages,
        [rows[i : i + spec.train.batch_size] for i in range(0, len(rows), spec.train.batch_size)],
    )


def _mel_approximation(data, rows, extractor, mel_augmenter, clips: int = 64) -> str:
    """How far mel-domain shift + noise is from the waveform's, on the same draws.

    Per clip: a shift of whole hops and a noise stretch starting on a hop, at a
    volume from ``augment=default``'s range; the waveform side shifts, adds the
    stretch, clips to [-1, 1] and computes log-mels; the mel side shifts the cached
    log-mels and adds the stretch's mel power. Compared on the frames away from
    the shift's cut and the clip's ends (two hops), against the change the exact
    augmentation makes to the clean log-mels.
    """
    import math

    import numpy as np
    import torch

    fc, bank, power = extractor.config, mel_augmenter.noise_bank, mel_augmenter.noise_power
    hop, frames, length = fc.hop_length, data.features.shape[-1], data.waves.shape[1]
    idx = rows[:clips]
    waves = torch.from_numpy(np.array(data.waves[idx]))
    clean = torch.from_numpy(np.array(data.features[idx]))[:, 0]
    rng = np.random.default_rng(0)
    gaps, effects, every = [], [], []
    for i in range(len(idx)):
        shift = int(rng.integers(-10, 11))
        start = int(rng.integers(0, power.shape[1] - frames + 1))
        volume = float(rng.uniform(0.0, 0.1))
        moved = torch.zeros(length)
        cut = shift * hop
        if cut >= 0:
            moved[cut:] = waves[i, : length - cut]
        else:
            moved[:cut] = waves[i, -cut:]
        noisy = (moved + volume * bank[start * hop : start * hop + length]).clamp(-1, 1)
        exact = extractor(noisy[None])[0, 0]
        shifted = torch.full_like(clean[i], math.log(fc.log_offset))
        if shift >= 0:
            shifted[:, shift:] = clean[i, :, : frames - shift]
        else:
            shifted[:, :shift] = clean[i, :, -shift:]
        approx = torch.log(shifted.exp() + volume**2 * power[:, start : start + frames])
        lo, hi = (shift, frames - 1) if shift >= 0 else (0, frames - 1 + shift)
        keep = slice(lo + 2, hi - 1)
        gaps.append((approx - exact)[:, keep].abs().flatten())
        every.append((approx - exact).abs().flatten())
        unshifted = clean[i][:, lo - shift + 2 : hi - shift - 1]
        effects.append((exact[:, keep] - unshifted).abs().flatten())
    gap, effect = torch.cat(gaps), torch.cat(effects)
    q = torch.tensor([0.5, 0.95])
    g50, g95 = torch.quantile(gap, q).tolist()
    a50, a95 = torch.quantile(torch.cat(every), q).tolist()
    e50, e95 = torch.quantile(effect, q).tolist()
    return (
        f"augment.domain=mel against the exact waveform augmentation ({len(idx)} clips, "
        f"the same shifts of whole hops, noise stretches and volumes): |difference| of the "
        f"log-mels on the frames two hops or more from the shift's cut and the clip's ends, "
        f"median {g50:.3f}, 95th percentile {g95:.3f} (natural log units); on every frame, "
        f"median {a50:.3f}, 95th percentile {a95:.3f}. On the same frames, the exact "
        f"augmentation itself changes the clean log-mels by a median {e50:.3f}, 95th "
        f"percentile {e95:.3f}. The volume is drawn as augment=default draws it; with "
        f"augment.noise_snr_db the mel side measures the ratio on mel power, not on samples."
    )


def _librosa_stages(pipe: LibrosaPipeline, paths) -> dict[str, float]:
    """Seconds per stage of one librosa pass (the steps of :meth:`LibrosaPipeline.clip`)."""
    import numpy as np

    rng = np.random.default_rng(7)
    stages = {
        "read WAV (soundfile)": lambda path, _: pipe.read(path),
        "shift + noise (NumPy)": lambda _, y: pipe.shift_and_noise(y, rng),
        "melspectrogram (librosa)": lambda _, y: pipe.melspectrogram(y),
        "log": lambda _, mel: pipe.log(mel),
    }
    return _timed_stages(stages, paths)


def _timed_stages(stages: dict, items) -> dict[str, float]:
    """Run ``stages`` in order on each item (each gets the item and the previous output)."""
    totals = dict.fromkeys(stages, 0.0)
    for item in items:
        out = None
        for name, stage in stages.items():
            start = time.perf_counter()
            out = stage(item, out)
            totals[name] += time.perf_counter() - start
    return totals


def _notes(
    n: int, cached: dict[str, float], mel: dict[str, float], librosa_: dict[str, float]
) -> str:
    """Markdown: where each pipeline's time goes (ms per 1,000 clips)."""
    lines = [
        f"Where the time goes (one extra pass each, stage by stage, ms per 1,000 clips; "
        f"{n} clips):",
        "",
        "| pipeline | stage | ms / 1,000 clips | share |",
        "|---|---|---|---|",
    ]
    for label, stages in (("cached", cached), ("cached, domain=mel", mel), ("librosa", librosa_)):
        total = sum(stages.values())
        for name, seconds in [*stages.items(), ("total", total)]:
            lines.append(
                f"| {label} | {name} | {1000 * seconds * 1000 / n:.0f} "
                f"| {100 * seconds / total:.0f} % |"
            )
    return "\n".join(lines)


def run(args) -> list[Ratio]:
    """Measure both pipelines on the same clips, interleaved; the ratio of their rates."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        spec, data, rows, augmenter, extractor, mel_augmenter, mel_setup_s = _setup(
            args.pipeline_clips
        )
        pipe = LibrosaPipeline(spec, data)
        paths = [str(p) for p in data.paths[rows]]
        diff = _agreement(data, rows, extractor, pipe)
        _cached_pass(spec, data, rows[:64], augmenter, extractor, seed=99)  # warm-up
        pipe.run(paths[:16], seed=99)
        _cached_pass(spec, data, rows[:64], mel_augmenter, None, seed=99)
        cached, mel, librosa_ = [], [], []
        for rep in range(args.pipeline_repeats):
            cached.append(_cached_pass(spec, data, rows, augmenter, extractor, seed=rep))
            common.progress("pipeline", f"pass {rep + 1}: cached {cached[-1][0]:.2f} s")
            mel.append(_cached_pass(spec, data, rows, mel_augmenter, None, seed=rep))
            common.progress("pipeline", f"pass {rep + 1}: cached, domain=mel {mel[-1][0]:.2f} s")
            librosa_.append(pipe.run(paths, seed=rep))
            common.progress("pipeline", f"pass {rep + 1}: librosa {librosa_[-1][0]:.2f} s")
        common.progress("pipeline", "one more pass each, timed stage by stage")
        global NOTES
        NOTES = _notes(
            len(rows),
            _cached_stages(spec, data, rows, augmenter, extractor),
            _mel_stages(spec, data, rows, mel_augmenter),
            _librosa_stages(pipe, paths),
        )
        NOTES += "\n\n" + _mel_approximation(data, rows, extractor, mel_augmenter)
    n = len(rows)
    assert all(c == n for _, c in cached + mel + librosa_)
    fast, slow = n / min(t for t, _ in cached), n / min(t for t, _ in librosa_)
    mel_rate = n / min(t for t, _ in mel)
    ratio, mel_ratio = fast / slow, mel_rate / slow
    details = (
        f"{n} training clips of the default dataset, augment=default, features=logmel; "
        f"cached {fast:,.0f} clips/s (iterate_batches, batch {spec.train.batch_size}) vs "
        f"librosa {slow:,.0f} clips/s (soundfile + NumPy augmentation + "
        f"librosa.feature.melspectrogram); best of {args.pipeline_repeats} interleaved passes "
        f"each, one thread for both; un-augmented log-mels of the two agree within {diff:.1e}"
    )
    noise_s = len(mel_augmenter.noise_bank) / spec.features.sample_rate
    mel_details = (
        f"the same clips and librosa passes; augment=default augment.domain=mel: "
        f"{mel_rate:,.0f} clips/s from the cached log-mels (shift by whole frames, noise added "
        f"as mel power, no STFT per epoch), plus once per process {mel_setup_s:.2f} s "
        f"for the noise bank's mel power ({noise_s:,.0f} s of "
        f"audio), not in the passes; an approximation of the waveform augmentation: how "
        f"close, in NOTES"
    )
    return [
        Ratio("cached_vs_librosa_clips_per_s", ratio, f">= {TARGET:g}x", ratio >= TARGET, details),
        Ratio(
            "cached_vs_librosa_clips_per_s, augment.domain=mel",
            mel_ratio,
            f">= {TARGET:g}x",
            mel_ratio >= TARGET,
            mel_details,
        ),  # fmt: skip
    ]


if __name__ == "__main__":
    raise SystemExit(common.main_for(__file__))
