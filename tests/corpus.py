"""Where the tests read real text: `../shared/data` beside the checkout, or `$GPT2REPRO_TEST_DATA`."""

import os
from pathlib import Path

DATA_DIR = Path(os.environ.get("GPT2REPRO_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
