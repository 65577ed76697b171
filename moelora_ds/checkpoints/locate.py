"""Where a run's checkpoints are: the directory layout, the complete tags, `latest`, and the run info file.

Layout: `output_dir/checkpoints/<tag>/` (DeepSpeed's files, `moelora_run.json`, one `rng_state_rank<R>.pt`
per rank) and `output_dir/checkpoints/latest` naming the newest complete tag. A checkpoint is complete
when its `moelora_run.json` exists and its directory is not a `.tmp-` staging directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

CHECKPOINTS = "checkpoints"
"""OUTPUT_DIR/checkpoints/<tag>/"""
RUN_FILE = "moelora_run.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or unreadable; the message names the path and what is wrong."""


def tag_for_step(step: int) -> str:
    return f"step_{step}"


def read_run_info(checkpoint_dir: Path) -> dict:
    """The run info (`moelora_run.json`) of a checkpoint tag directory."""
    path = checkpoint_dir / RUN_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from None
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is corrupt or unreadable ({type(error).__name__}: {error})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path} is corrupt: expected a JSON object")
    return info


def list_checkpoints(root: Path) -> list[str]:
    """Complete checkpoint tags under `root` (an OUTPUT_DIR/checkpoints directory), oldest first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and (p / RUN_FILE).is_file()
            and not p.name.startswith(TMP_PREFIX)]
    return sorted(tags, key=lambda t: (read_run_info(root / t).get("step", -1), t))


def latest_tag(root: Path) -> Optional[str]:
    """The tag `root/latest` names, checked to be complete; None when no checkpoint was published.

    While a checkpoint is saved again under the tag `latest` names, `latest` names its complete staging
    directory (`.tmp-<tag>`), and then, once that is renamed, means `<tag>` (save_load._publish)."""
    latest = root / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if tag.startswith(TMP_PREFIX) and not (root / tag).is_dir():  # named while its tag was saved again; published
        tag = tag[len(TMP_PREFIX):]
    if not (root / tag / RUN_FILE).is_file():
        raise CheckpointError(f"{latest} names checkpoint {tag!r} and {root / tag / RUN_FILE} is missing "
                              f"(incomplete or moved); complete checkpoints: {list_checkpoints(root) or 'none'}")
    return tag


def resolve_resume(root: Path, resume: str) -> Optional[tuple[Path, str]]:
    """(checkpoint root, tag) to resume from, or None to start fresh. `resume`: auto | never | a tag directory."""
    if resume == "never":
        return None
    if resume == "auto":
        tag = latest_tag(root)
        return None if tag is None else (root, tag)
    path = Path(resume)
    if not (path / RUN_FILE).is_file():
        raise CheckpointError(f"{path} is not a moelora-ds checkpoint directory (no {RUN_FILE}); expected auto, "
                              f"never or a directory like OUTPUT_DIR/checkpoints/step_100")
    return path.parent, path.name


def resolve_checkpoint_dir(checkpoint: Path, tag: Optional[str] = None) -> Path:
    """`OUTPUT_DIR` (+ tag, default: the one `checkpoints/latest` names) -> `OUTPUT_DIR/checkpoints/<tag>`.

    A checkpoint tag directory itself (one holding moelora_run.json) is accepted too.
    """
    if tag is None and (checkpoint / RUN_FILE).is_file():
        return checkpoint
    root = checkpoint / CHECKPOINTS
    if not root.is_dir():
        raise CheckpointError(f"{checkpoint}: no checkpoints/ directory (expected a training run's output_dir)")
    if tag is None:
        tag = latest_tag(root)
        if tag is None:
            raise CheckpointError(f"{root / LATEST} is missing: no complete checkpoint was published; "
                                  f"complete tags: {', '.join(list_checkpoints(root)) or 'none'} (pass one with --tag)")
    path = root / tag
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {tag!r} not found: {path} does not exist; "
                              f"complete tags: {', '.join(list_checkpoints(root)) or 'none'}")
    if not (path / RUN_FILE).is_file():
        raise CheckpointError(f"{path / RUN_FILE} is missing: the checkpoint is incomplete")
    return path
