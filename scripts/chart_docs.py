"""Write the values table of helm/finetune-operator/README.md from the `# --` comments of values.yaml.

`python scripts/chart_docs.py` rewrites the table; `--check` fails when it is stale.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent.parent / "helm" / "finetune-operator"
START, END = "<!-- values:start -->", "<!-- values:end -->"
KEY = re.compile(r"^(\s*)([A-Za-z0-9_]+):")


def rows(values_text: str) -> list[tuple[str, str, str]]:
    values = yaml.safe_load(values_text)
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    out = []
    for line in values_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#") and pending:
            pending.append(stripped[1:].strip())
            continue
        match = KEY.match(line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        if pending:
            path = ".".join(name for _, name in stack)
            value: Any = values
            for _, name in stack:
                value = value[name]
            out.append((path, json.dumps(value), " ".join(pending)))
            pending = []
    return out


def table(values_text: str) -> str:
    lines = ["| Key | Default | Description |", "|---|---|---|"]
    for path, default, description in rows(values_text):
        lines.append(f"| `{path}` | `{default}` | {description.replace('|', '/')} |")
    return "\n".join(lines)


def render(readme: str, values_text: str) -> str:
    head, _, rest = readme.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{table(values_text)}\n{END}{tail}"


def main(argv: list[str]) -> int:
    readme_path = CHART / "README.md"
    readme = readme_path.read_text()
    updated = render(readme, (CHART / "values.yaml").read_text())
    if "--check" in argv:
        if updated != readme:
            print(f"{readme_path} is stale: run `make chart-docs`", file=sys.stderr)
            return 1
        return 0
    readme_path.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
