"""Export a checkpoint without installing the package: `python launcher/export.py --checkpoint OUTPUT_DIR --out DIR`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelora_ds.cli import export_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_main())
