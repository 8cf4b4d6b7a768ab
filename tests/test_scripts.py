"""The shell scripts' checks that run before anything is installed."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_refuses_a_missing_text_file_in_one_line_before_installing(tmp_path):
    missing = tmp_path / "no-such.txt"
    venv_before = (REPO / ".venv").exists()
    result = subprocess.run(["bash", str(REPO / "scripts" / "quickstart.sh"), str(missing)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == f"quickstart: no text file at {missing}"
    assert result.stdout == ""
    assert (REPO / ".venv").exists() == venv_before  # nothing was installed
