"""The package as a user installs it: `python -m build` makes a wheel and an sdist, and the wheel, installed into a
fresh virtual environment, runs `trl-bapo --help` and trains 2 steps on the embedded model."""

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import trl_bapo

ROOT = Path(__file__).resolve().parents[1]
# The fresh environment sees nothing of this one's: no import path into a checkout, no active virtual environment.
CLEAN = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def run(command: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=CLEAN)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def test_wheel_installs_into_a_fresh_environment_and_trains(tmp_path):
    run([sys.executable, "-m", "build", "--wheel", "--sdist", "--outdir", str(tmp_path / "dist"), str(ROOT)], ROOT)
    wheel = next((tmp_path / "dist").glob("trl_bapo-*.whl"))
    sdist = next((tmp_path / "dist").glob("trl_bapo-*.tar.gz"))
    version = trl_bapo.__version__
    assert wheel.name.startswith(f"trl_bapo-{version}-") and sdist.name == f"trl_bapo-{version}.tar.gz"
    packaged = zipfile.ZipFile(wheel).namelist()
    for module in ("trl_bapo/trainer.py", "trl_bapo/builtin/tasks.py", "trl_bapo/examples/demo.py"):
        assert module in packaged, module
    assert f"trl_bapo-{version}/pyproject.toml" in tarfile.open(sdist).getnames()

    # A fresh environment: the CPU torch first (as the Makefile installs it), then the wheel and what it requires.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    run([*pip, "torch==2.13.0"], tmp_path)
    run([*pip, str(wheel)], tmp_path)
    where = run([str(venv / "bin" / "python"), "-c", "import trl_bapo; print(trl_bapo.__file__)"], tmp_path)
    assert where.stdout.strip().startswith(str(venv)), where.stdout  # the wheel's copy, not this checkout's

    helped = run([str(venv / "bin" / "trl-bapo"), "--help"], tmp_path)
    assert "--rollout_delay" in helped.stdout and "--track_prompts" in helped.stdout
    run(
        [str(venv / "bin" / "trl-bapo"), "--config", str(ROOT / "recipes" / "demo.yaml"), "--max_steps", "2"]
        + ["--output_dir", str(tmp_path / "run"), "--save_strategy", "steps", "--save_steps", "2"]
        + ["--num_processes", "1"],
        tmp_path,
    )
    assert (tmp_path / "run" / "checkpoint-2" / "bapo_state_0.pt").exists()
