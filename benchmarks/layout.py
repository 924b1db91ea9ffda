"""Memory layout: the study CNN channels last (``model.channels_last=true``) vs channels first.

The ``bn_study`` model (the tutorial CNN with 8 and 8 channels) on batches of
the embedded dataset's shape (1 x 40 x 101 log-mel), one thread as in a Ray
client: one AdamW training step on a batch of 64, and one eval-mode forward
pass on a batch of 256, for each norm the study uses. Both layouts run in the
same process, alternating, and each time is the median of its repeats; the
ratio is channels first over channels last (above 1: channels last is faster).
The target only asks that the option does what it is for.
"""

from __future__ import annotations

import statistics
import time

import common
from common import Ratio

TITLE = "layout: the study CNN channels last vs channels first (1 thread)"
NAME = "layout"
NOTES = ""
NORMS = ("batch", "group", "layer", "ws")
REPEATS = 7


def _timers(norm: str, channels_last: bool):
    import torch

    from fedkws.core.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn", 12, norm=norm, channels=(8, 8), channels_last=channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 1, 40, 101), torch.randint(0, 12, (64,))
    x_eval = torch.randn(256, 1, 40, 101)

    def train_step() -> None:
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def eval_pass() -> None:
        model.eval()
        with torch.no_grad():
            model(x_eval)

    return {"train": train_step, "eval": eval_pass}


def _median_seconds(fn, repeats: int = REPEATS) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args) -> list[Ratio]:
    """Both layouts for each norm, alternating in one process."""
    global NOTES
    import torch

    torch.set_num_threads(1)
    ratios, notes = [], []
    for norm in NORMS:
        first, last = _timers(norm, False), _timers(norm, True)
        for what in ("train", "eval"):
            t_first, t_last = [], []
            for _ in range(3):  # alternate, so a drift in the machine's speed hits both
                t_first.append(_median_seconds(first[what]))
                t_last.append(_median_seconds(last[what]))
            a, b = min(t_first), min(t_last)
            common.progress(NAME, f"{norm} {what}: {a * 1e3:.1f} ms first, {b * 1e3:.1f} ms last")
            notes.append(f"{norm} {what} {a * 1e3:.1f} / {b * 1e3:.1f} ms")
            what_long = "training step (64)" if what == "train" else "eval forward (256)"
            ratios.append(
                Ratio(f"norm={norm} {what_long}: first / last", a / b, "> 1x", a / b > 1,
                      "median of 7, best of 3 alternations")
            )  # fmt: skip
    NOTES = "channels first / channels last: " + "; ".join(notes) + "."
    return ratios


if __name__ == "__main__":
    raise SystemExit(common.main_for(__file__))
