"""Prepare a config's data without installing the package: `python launcher/prepare.py --config FILE`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelora_ds.cli import prepare_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(prepare_main())
