"""The docs a newcomer walks: tables that render, and the trainer's module table made of what
is there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAINER = ROOT / "trainer-image" / "finetune_trainer"


def test_the_trainer_readmes_module_table_lists_every_module_and_no_other() -> None:
    text = (ROOT / "trainer-image" / "README.md").read_text()
    table = text.split("\n## Modules\n", 1)[1]
    rows = set(re.findall(r"^\| `([\w/.]+)` \|", table, flags=re.M))
    modules = {p.name for p in TRAINER.glob("*.py") if p.name != "__init__.py"}
    packages = {f"{p.name}/" for p in TRAINER.iterdir() if (p / "__init__.py").is_file()}
    assert rows == modules | packages


def test_every_readme_table_is_one_block() -> None:
    """A blank line inside a table ends it: the rows after it render as a paragraph."""
    for readme in (ROOT / "README.md", ROOT / "trainer-image" / "README.md", ROOT / "bench" / "README.md"):
        lines = readme.read_text().splitlines()
        for index in range(2, len(lines)):
            if lines[index].startswith("| ") and not lines[index - 1].strip() and lines[index - 2].startswith("|"):
                raise AssertionError(f"{readme.relative_to(ROOT)}:{index + 1}: a table broken by a blank line")


def test_the_trainer_readme_has_a_table_of_contents() -> None:
    text = (ROOT / "trainer-image" / "README.md").read_text()
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    contents = text.split("## Contents\n", 1)[1].split("\n## ", 1)[0]
    assert [h for h in headings if h != "Contents"] == re.findall(r"^- \[(.+)\]\(#", contents, flags=re.M)
