"""The benchmark's --quick mode (tiny model through ComfyUI's stock KSampler path) runs and its
counted model calls show one pass per step for DICE and TeEFusion at cfg 1, two for CFG."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sampling_benchmark_quick(tmp_path):
    res = subprocess.run([sys.executable, "benchmarks/sampling_benchmark.py", "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "call counts: OK" in res.stdout
    rows = [line for line in res.stdout.splitlines() if line.startswith("| tiny")]
    dice = next(r for r in rows if "| DICE |" in r).split("|")
    cfg = next(r for r in rows if "| CFG |" in r).split("|")
    assert dice[6].strip() == "1" and dice[7].strip() == "1"  # calls / step, rows / step
    assert cfg[7].strip() == "2"
    assert any(name.startswith("sampling-") and name.endswith(".json") for name in os.listdir(tmp_path))
