"""Checkpoint rotation and `latest`: what is kept after resuming from an older checkpoint, and `latest` naming a
complete checkpoint at every moment of a save, also when the checkpoint it names is saved again."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from moelora_ds.checkpoints import save_load
from moelora_ds.checkpoints.locate import LATEST, RUN_FILE, TMP_PREFIX, latest_tag, list_checkpoints, tag_for_step


def fake_checkpoint(root: Path, step: int, staged: bool = False, marker: str = "") -> Path:
    """A complete checkpoint directory of `step` (a run info file and one weight file), or its staging directory."""
    path = root / f"{TMP_PREFIX if staged else ''}{tag_for_step(step)}"
    path.mkdir(parents=True)
    (path / "weights.pt").write_text(marker)
    (path / RUN_FILE).write_text(json.dumps({"step": step, "tag": tag_for_step(step)}))
    return path


def publish(root: Path, step: int, keep: int, marker: str = "") -> list[str]:
    """What save_checkpoint's rank 0 does once every rank has written `step`: publish, then prune."""
    fake_checkpoint(root, step, staged=True, marker=marker)
    save_load._publish(root, tag_for_step(step))
    return save_load.prune(root, step, keep)


@pytest.mark.parametrize("keep", [1, 2])
def test_resumed_branch_keeps_its_newest_and_drops_the_abandoned_one(tmp_path, keep):
    """Steps 2, 4 and 6 saved; the run resumes from step 2 and publishes step 3: the abandoned branch's steps 4
    and 6 (higher steps) must not push out step 3, which `latest` names."""
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        publish(root, step, keep=0)
    deleted = publish(root, 3, keep=keep)
    assert latest_tag(root) == "step_3"
    assert list_checkpoints(root) == ["step_2", "step_3"][-keep:]
    assert sorted(deleted) == sorted({"step_2", "step_4", "step_6"} - set(list_checkpoints(root)))
    publish(root, 5, keep=keep)  # the branch goes on: its own older checkpoint rotates out as usual
    assert latest_tag(root) == "step_5" and list_checkpoints(root) == ["step_3", "step_5"][-keep:]


def test_keep_zero_keeps_everything(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 3):
        publish(root, step, keep=0)
    assert list_checkpoints(root) == ["step_2", "step_3", "step_4", "step_6"] and latest_tag(root) == "step_3"


def test_latest_never_dangles_while_the_checkpoint_it_names_is_saved_again(tmp_path, monkeypatch):
    """Every rename and deletion of the re-save is checked: before and after it, `latest` resolves to a complete
    checkpoint; at the end it names the new one."""
    root = tmp_path / "checkpoints"
    publish(root, 6, keep=1, marker="old")
    seen = []

    def checked(function):
        def wrapper(*args, **kwargs):
            for moment in ("before", "after"):
                if moment == "after":
                    result = function(*args, **kwargs)
                tag = latest_tag(root)  # raises CheckpointError if it names a missing or incomplete checkpoint
                assert (root / tag / "weights.pt").is_file(), (moment, function.__name__, args)
                seen.append(tag)
            return result
        return wrapper

    monkeypatch.setattr(save_load.os, "replace", checked(os.replace))
    monkeypatch.setattr(save_load.shutil, "rmtree", checked(shutil.rmtree))
    publish(root, 6, keep=1, marker="new")
    assert (root / LATEST).read_text() == "step_6" and (root / "step_6" / "weights.pt").read_text() == "new"
    assert f"{TMP_PREFIX}step_6" in seen  # it named the staged copy while the old one was moved away
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_6"]


def test_latest_naming_a_published_staging_directory_means_its_tag(tmp_path):
    """A crash between the rename and the final `latest` write leaves `latest` naming `.tmp-<tag>`: it means <tag>;
    the next save of that step finishes the publication before it stages anew."""
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 6)
    (root / LATEST).write_text(f"{TMP_PREFIX}step_6")
    assert latest_tag(root) == "step_6"
    fake_checkpoint(root, 6, staged=True, marker="staged")
    shutil.rmtree(root / "step_6")
    assert latest_tag(root) == f"{TMP_PREFIX}step_6"  # not yet renamed: the complete staging directory itself
