"""``python -m fedkws.data.synth --root DIR ...``: generate the synthetic dataset."""

from fedkws.data.synth.dataset import main_generate

raise SystemExit(main_generate())
