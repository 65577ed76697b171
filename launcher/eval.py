"""Entry point for the deepspeed launcher, torchrun, mpirun and srun.

`deepspeed launcher/eval.py --config CFG [--checkpoint RUN_DIR | --model DIR]`
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelora_ds.cli import eval_command  # noqa: E402

if __name__ == "__main__":
    eval_command()
