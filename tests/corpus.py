"""Where the tests read real text.

The repository ships small excerpts in `tests/fixtures/` (see its README.md), so the suite runs on any
clone. The larger corpora in `../shared/data` beside the checkout, or in `$GPT2REPRO_TEST_DATA`, are
read instead when that folder exists and holds the file. A path that does not exist counts as absent.
"""

import os
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _shared_dir() -> Path | None:
    path = Path(os.environ.get("GPT2REPRO_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    return path if path.is_dir() else None


SHARED: Path | None = _shared_dir()


def shared_file(name: str) -> Path | None:
    """`SHARED / name` when the shared folder exists and holds that file, else None."""
    if SHARED is not None and (SHARED / name).is_file():
        return SHARED / name
    return None


def corpus(name: str) -> Path:
    """The shared copy of `name` when there is one, else the fixture of that name."""
    path = shared_file(name) or FIXTURES / name
    if not path.is_file():
        raise FileNotFoundError(f"no test corpus {name!r} in {SHARED or 'the shared data folder'} or {FIXTURES}")
    return path


def is_fixture(path: Path) -> bool:
    """Whether `path` is one of the excerpts shipped in tests/fixtures (tests whose expected counts
    depend on the text pick them with this)."""
    return path.resolve().parent == FIXTURES
