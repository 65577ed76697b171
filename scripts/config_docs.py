"""The configuration reference (every key, its type, default and meaning) generated from the dataclasses.

Field documentation is the string literal under each field, read from the source with `ast`, so the
README table cannot drift from the code. `python scripts/config_docs.py` prints the table;
`python scripts/config_docs.py --write` rewrites it between the README's config-reference markers.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelora_ds.config import RunConfig  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def field_docs(cls: type) -> dict[str, str]:
    """{field name: the docstring literal that follows it in the class body}."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _default(f) -> object:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def _format(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value}`"


def reference_rows() -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every configuration key."""
    rows = []
    hints = typing.get_type_hints(RunConfig)
    for top in fields(RunConfig):
        if top.metadata.get("internal"):
            continue
        section = hints[top.name]
        if is_dataclass(section):
            docs, section_hints = field_docs(section), typing.get_type_hints(section)
            for f in fields(section):
                type_name = str(section_hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
                rows.append((f"{top.name}.{f.name}", type_name, _format(_default(f)), docs.get(f.name, "")))
        else:
            rows.append((top.name, "str | dict", _format(_default(top)), field_docs(RunConfig).get(top.name, "")))
    return rows


def reference_markdown() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{key}` | {kind.replace('|', '&#124;')} | {default} | {doc} |"
              for key, kind, default, doc in reference_rows()]
    return "\n".join(lines) + "\n"


def render(text: str) -> str:
    """`text` (the README) with the table between the config-reference markers regenerated."""
    return re.sub(f"{re.escape(START)}.*?{re.escape(END)}", f"{START}\n{reference_markdown()}{END}", text, flags=re.S)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        README.write_text(render(README.read_text()))
    else:
        print(reference_markdown(), end="")
