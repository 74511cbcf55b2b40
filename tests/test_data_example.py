"""The contact-sheet example runs end to end and writes its PNG files (slow: it builds every dataset)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_contact_sheet_example_writes_pngs(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "images"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "data_contact_sheets.py"), "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    names = {"rotated_mnist", "colored_mnist", "rotated_digits", "rotated_animals", "data_domains"}
    assert {p.stem for p in out.glob("*.png")} == names
    assert "rotated_mnist" in proc.stdout and "cache MB" in proc.stdout
    assert not (tmp_path / "hf").exists()  # the example builds into its own temporary cache
