"""Regenerate the configuration reference table between the README's config-reference markers."""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelora_ds.config_docs import reference_markdown  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def render(text: str) -> str:
    return re.sub(f"{re.escape(START)}.*?{re.escape(END)}", f"{START}\n{reference_markdown()}{END}", text, flags=re.S)


if __name__ == "__main__":
    README.write_text(render(README.read_text()))
