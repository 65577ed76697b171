"""scripts/gpu_sweep.sh: a model brought to the GPU machine in parts, a call per part, is joined whole or not at all."""

import hashlib
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAME = "model.gguf"


def sweep(command: str, parts: Path, stage: Path, subprocess_env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_sweep.sh"), command], capture_output=True, text=True,
                          env={**subprocess_env, "GPU_PARTS": str(parts), "GPU_STAGE": str(stage)}, timeout=60)


def split(data: bytes, root: Path, sizes: list[int]) -> None:
    """The layout scripts/gpu_prepare.sh writes: .gpu-modelN/NAME.partN, the checksum beside part 1."""
    start = 0
    for number, size in enumerate(sizes, 1):
        folder = root / f".gpu-model{number}"
        folder.mkdir(parents=True)
        (folder / f"{NAME}.part{number}").write_bytes(data[start:start + size])
        start += size
    (root / ".gpu-model1" / "SHA256SUMS").write_text(f"{hashlib.sha256(data).hexdigest()}  {NAME}\n")


def test_parts_brought_in_separate_calls_join_to_the_file(tmp_path, subprocess_env):
    data = bytes(range(256)) * 41 + b"tail"
    sizes = [1000, 3000, 2000, 1000, 1000, 1000, 1000, 1000, 1000, len(data) - 12000]  # 10 parts: part10 after part9
    split(data, tmp_path / "all", sizes)
    stage = tmp_path / "stage"
    for number in (1, 2):  # two calls, each bringing some of the folders
        call = tmp_path / f"call{number}"
        call.mkdir()
        for folder in sorted((tmp_path / "all").iterdir()):
            if (int(folder.name.removeprefix(".gpu-model")) <= 5) == (number == 1):
                folder.rename(call / folder.name)
        result = sweep("join" if number == 2 else "stage", call, stage, subprocess_env)
        assert result.returncode == 0, result.stderr
    assert "joined model.gguf from 10 part(s), SHA-256 verified" in result.stdout
    assert (stage / NAME).read_bytes() == data


def test_a_missing_or_damaged_part_is_named_and_nothing_is_left(tmp_path, subprocess_env):
    data = b"x" * 5000 + b"y" * 5000
    split(data, tmp_path, [4000, 6000])
    stage = tmp_path / "stage"
    (tmp_path / ".gpu-model2" / f"{NAME}.part2").unlink()
    result = sweep("join", tmp_path, stage, subprocess_env)
    assert result.returncode == 2
    assert f"{NAME} joined from [{NAME}.part1] fails its SHA-256" in result.stderr
    assert not (stage / NAME).exists()

    (tmp_path / ".gpu-model2" / f"{NAME}.part2").write_bytes(b"y" * 6000)  # right size, wrong bytes
    result = sweep("join", tmp_path, stage, subprocess_env)
    assert result.returncode == 2 and "fails its SHA-256" in result.stderr
    assert not (stage / NAME).exists()


def test_join_without_the_checksum_says_what_to_bring(tmp_path, subprocess_env):
    result = sweep("join", tmp_path, tmp_path / "stage", subprocess_env)
    assert result.returncode == 2 and "SHA256SUMS missing: bring .gpu-model1/" in result.stderr
