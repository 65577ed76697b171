"""Build data/wordnet/{train,test}.jsonl from Debian's WordNet 3.0; same as `python -m moelora_ds.data.wordnet`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelora_ds.data.wordnet import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
