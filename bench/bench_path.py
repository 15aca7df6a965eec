"""Put the repository root on sys.path, so `python bench/<script>.py` imports models/ and datamodules/."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
