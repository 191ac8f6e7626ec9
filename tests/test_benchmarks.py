"""The benchmark command runs end to end (its figures are measured, not tested here)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_command_writes_its_report(tmp_path):
    out = tmp_path / "B.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--only", "storage", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "## Machine" in text and "## 3. Storage" in text
    # bit-packed storage is exactly one bit per masked weight
    assert "1.0000 bit/weight" in text
    bad = subprocess.run([sys.executable, "-m", "benchmarks.run", "--only", "nosuch"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nosuch" in bad.stderr
