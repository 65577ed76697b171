"""Reading checkpoint files without running code from them: torch's weights-only unpickler and an allow-list.

DeepSpeed 0.19.8 reads its own checkpoint files with `torch.load(..., weights_only=False)`
(`TorchCheckpointEngine.load`, `zero_to_fp32`), which would run any callable pickled into a foreign
file. Every `.pt` file of a checkpoint is therefore first read here with `weights_only=True`, allowing
only the classes DeepSpeed and our RNG state legitimately store; a file holding anything else is
refused with a CheckpointError before DeepSpeed opens it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelora_ds.checkpoints.locate import CheckpointError


def allowed_globals() -> list:
    """What our checkpoint files may hold besides tensors and plain containers (numpy RNG state, DeepSpeed enums)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    numpy_core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core (what its pickles name) to np._core
    numpy_dtypes = [type(np.dtype(name)) for name in ("uint32", "int64", "float64", "float32", "bool")]
    return [np.ndarray, np.dtype, numpy_core.multiarray._reconstruct, *numpy_dtypes,
            ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def safe_load(path: Path, mmap: bool = False) -> Any:
    """`torch.load(path)` on the CPU with the weights-only unpickler; a CheckpointError names a refused file."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        found = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        reason = found[0] if found else type(error).__name__
        raise CheckpointError(f"{path}: refused: it holds an object that is neither a tensor nor on the allow-list "
                              f"of checkpoint contents ({reason}); checkpoints are never loaded in a way that "
                              f"could run code from them") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path}: unreadable, truncated or corrupt ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''})") from None


def vet_checkpoint_files(checkpoint_dir: Path) -> None:
    """Read every `.pt` file of a checkpoint tag directory with `safe_load` (memory-mapped) before DeepSpeed does."""
    for path in sorted(checkpoint_dir.rglob("*.pt")):
        safe_load(path, mmap=True)
