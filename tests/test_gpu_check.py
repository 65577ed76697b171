"""scripts/gpu_check.sh --smoke: the GPU correctness check's every step, tiny and on the CPU, so that it cannot rot."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from conftest import REPO


@pytest.mark.distributed  # one `deepspeed --num_gpus 1 launcher/train.py` among its checks
def test_gpu_check_smoke(tmp_path, subprocess_env):
    env = dict(subprocess_env, PYTHON=sys.executable)
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--smoke", "--work", str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and lines[-1].startswith("PASSED: 0 check(s) failed"), \
        result.stdout[-4000:] + result.stderr[-2000:]
    checks = Counter(tuple(line.split()[:2]) for line in lines if line.split()[0] in ("PASS", "FAIL", "SKIP"))
    # the start and micro-batch gradients of stages 0 and 3; 4 optimizer cases x stages 0 and 3; device binding,
    # 2 finiteness dtypes, 2 steps of host reads
    assert checks == {("PASS", "start"): 1, ("PASS", "grads"): 1, ("PASS", "stage"): 8, ("PASS", "device"): 5,
                      ("PASS", "bf16"): 2, ("PASS", "export"): 1,
                      ("PASS", "launcher"): 1}, result.stdout
    assert lines[0].startswith("gpu_check on cpu:") and "smoke" in lines[0]
    assert lines[1].startswith("PASS start     zero0 zero3 start from bitwise the reference's adapters")
