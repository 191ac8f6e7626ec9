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


def test_benchmark_command_keeps_the_transfer_section(tmp_path):
    from benchmarks.run import keep_transfer_section
    from benchmarks.transfer import BEGIN, END
    old = tmp_path / "B.md"
    old.write_text(f"# Benchmarks\nold figures\n{BEGIN}\nreal-data table\n{END}\ntail\n")
    text = keep_transfer_section(old, "# Benchmarks\nnew figures\n")
    assert "new figures" in text and "old figures" not in text
    assert f"{BEGIN}\nreal-data table\n{END}" in text
    assert keep_transfer_section(tmp_path / "absent.md", "x\n") == "x\n"
