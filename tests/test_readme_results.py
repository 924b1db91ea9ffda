"""The README's result tables are the report files they came from, character for character.

README.md embeds each table between ``<!-- report: PATH -->`` (or ``<!-- report: PATH
claims -->`` for the claims table) and ``<!-- /report -->``;
PATH is a file that ``fedkws report ... --markdown PATH`` wrote from the run folders (the
command stands beside it in the README). A compact table (``--columns``), named
``<report>.<columns>.md``, must agree with the full report ``<report>.md`` beside it in
every column they share.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"<!-- report: (\S+)(?: \w+)? -->\n(.*?)<!-- /report -->", re.S)
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_embeds_report_tables_verbatim():
    # Catches: a number typed or edited by hand, a table left stale after a rerun.
    blocks = BLOCK.findall(README)
    assert blocks, "README.md has no <!-- report: ... --> block"
    for path, block in blocks:
        source = (ROOT / path).read_text()
        assert block.strip() in source, f"README block differs from {path}"
        assert block.count("\n") >= 3, path  # a table, not an empty block


COMPACT = sorted({p for p, _ in BLOCK.findall(README) if "." in Path(p).stem})


@pytest.mark.parametrize("path", COMPACT)
def test_a_compact_table_agrees_with_its_full_report(path):
    # Catches: a compact table made from another sweep than the full report beside it.
    compact = ROOT / path
    full = compact.with_name(compact.name.split(".")[0] + ".md")
    small, big = markdown_table(compact.read_text()), markdown_table(full.read_text())
    assert small.keys() == big.keys()
    for cell, row in small.items():
        for column, value in row.items():
            if column in big[cell]:
                assert big[cell][column] == value, (cell, column)


def test_readme_images_exist():
    for image in IMAGE.findall(README):
        if not image.startswith("http"):
            assert (ROOT / image).is_file(), image


def test_literature_claims_are_bn_studys_rows():
    # Catches: a claim that reads differently in two sweeps of the same cells and seeds
    # (a nondeterministic run, or a report file regenerated from another sweep).
    def claims(name: str) -> list[str]:
        text = (ROOT / "experiments" / "results" / f"{name}.md").read_text()
        table = text.split("published claims", 1)[1].split("\n\n")[1]
        return table.splitlines()[2:]

    literature, study = claims("literature"), claims("bn_study")
    assert len(literature) >= 4
    assert set(literature) <= set(study)
