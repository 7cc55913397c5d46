"""Writes docs/config.md, the reference of `BAPOConfig`'s fields, from each field's `help` metadata (the one source of
their documentation, as the config's docstring and `trl-bapo --help` also read it).

    python docs/config_reference.py          # rewrite docs/config.md
    python docs/config_reference.py --check  # exit 1 if docs/config.md is not what this would write

`tests/test_docs.py` runs the check.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from trl_bapo import BAPOConfig
from trl_bapo.config import HEADINGS

PAGE = Path(__file__).resolve().parent / "config.md"


def default(field: dataclasses.Field) -> str:
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return f"`{value!r}`"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    fields = {field.name: field for field in dataclasses.fields(BAPOConfig)}
    lines = [
        "# BAPOConfig",
        "",
        "`trl_bapo.BAPOConfig` subclasses `trl.GRPOConfig`: every GRPOConfig field applies unchanged (TRL's",
        "GRPOConfig reference documents them); the fields below add Batch Adaptation Policy Optimization. Symbols",
        "are the paper's (Algorithm 1 in appendix A.8, defaults from Table 3). A bad value fails when the config is",
        "built, naming the field and the fix. Each field is also a command-line flag of `trl-bapo` and a key of its",
        "YAML recipes.",
        "",
        "This page is generated from the fields' help by `docs/config_reference.py`; `make test` checks it is",
        "current.",
    ]
    for heading, names in HEADINGS.items():
        lines += ["", f"## {heading}", "", "| field | type | default | meaning |", "|---|---|---|---|"]
        for name in names:
            field = fields[name]
            # The annotation as written: transformers' argument parser replaces `field.type` by the resolved type.
            kind, meaning = cell(BAPOConfig.__annotations__[name]), cell(field.metadata["help"])
            lines.append(f"| `{name}` | `{kind}` | {cell(default(field))} | {meaning} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if "--check" in argv:
        if PAGE.read_text() != render():
            print(f"{PAGE} is out of date: run `python docs/config_reference.py`.")
            return 1
        return 0
    PAGE.write_text(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
