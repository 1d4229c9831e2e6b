"""The GPU machine runs benchmarks/gpu_check.sh once, unattended: its pieces must work before it
gets there. The --billion run's code is checked on the CPU with the zoo's tiny replicate model."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def test_gpu_check_script_parses_and_names_its_stages():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)
    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    for stage in ("cuda_tests", "step_time", "billion", "paper_scale", "pytest"):
        assert f"stage {stage} " in text


def test_billion_run_code_path_on_the_cpu(tmp_path):
    out = tmp_path / "billion.md"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--billion",
                        "--smoke", "--steps", "4", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [l for l in out.read_text().splitlines() if l.startswith("| dense") or
            l.startswith("| SAL replicate")]
    assert len(rows) == 2 and not any("failed" in l for l in rows), rows
    losses = [float(l.split("|")[3]) for l in rows]
    assert all(0 < v < 20 for v in losses)
