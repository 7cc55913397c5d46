"""The embedded default is one model on every CPU: loaded and evaluated under several of torch's kernel paths (ATen's
capability, MKL's instruction set, oneDNN's ISA, the thread count) in fresh processes, it is the shipped weights
everywhere and its held-out accuracy lands in the stated band on each. An AVX2-only machine cannot simulate AVX-512:
there the default path is AVX2, and the test covers the paths the machine has."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from trl_bapo.builtin import embedded
from trl_bapo.builtin.embedded import BAND, SHIPPED_DIR, embedded_model, shipped_manifest

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
SETTINGS = {
    "default": {},
    "avx2, 1 thread": {**AVX2, "OMP_NUM_THREADS": "1"},
    "avx2, 2 threads": {**AVX2, "OMP_NUM_THREADS": "2"},
}
MEASURE = """
import json, torch
from transformers import AutoTokenizer
from trl_bapo.builtin.embedded import EVAL_SAMPLES, embedded_datasets, embedded_model, kernel_path, weights_sha256
from trl_bapo.builtin.rewards import load_reward
from trl_bapo.builtin.tiny import load_tiny_model
from trl_bapo.examples.evaluation import evaluate_policy

path = embedded_model()
_, heldout = embedded_datasets()
result = evaluate_policy(
    load_tiny_model(path), AutoTokenizer.from_pretrained(path), list(heldout), [], load_reward("carry"), EVAL_SAMPLES
)
print(json.dumps({"heldout": result["heldout"], "sha256": weights_sha256(path), **kernel_path()}))
"""


def measure(settings: dict[str, str], cache) -> dict:
    environment = {key: value for key, value in os.environ.items() if key not in SETTINGS["avx2, 1 thread"]}
    environment.update(settings, TRL_BAPO_CACHE=str(cache))
    done = subprocess.run(
        [sys.executable, "-c", MEASURE], env=environment, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_embedded_default_is_the_same_model_in_the_band_on_every_kernel_path(tmp_path):
    recorded = shipped_manifest()[embedded_model().name]
    figures = {name: measure(settings, tmp_path / "cache") for name, settings in SETTINGS.items()}
    for name, figure in figures.items():
        assert figure["sha256"] == recorded["sha256"], name
        assert BAND[0] <= figure["heldout"] <= BAND[1], (name, figure)
    # The settings took effect: the AVX2 runs computed on ATen's AVX2 path, at the thread count asked for.
    assert figures["avx2, 1 thread"]["cpu_capability"] == "AVX2" and figures["avx2, 1 thread"]["torch_threads"] == 1
    assert figures["avx2, 2 threads"]["torch_threads"] == 2
    accuracies = [figure["heldout"] for figure in figures.values()]
    assert max(accuracies) - min(accuracies) <= 0.05, figures
    assert abs(accuracies[0] - recorded["base_heldout"]["mean_at_8"]) <= 0.05, (figures, recorded)
    assert not any((tmp_path / "cache").glob("*")), "the shipped model was rebuilt instead of loaded"


def test_changed_weights_are_refused_with_the_way_out(tmp_path, monkeypatch):
    """A shipped model whose weights no longer match their recorded hash is never used silently."""
    name = embedded_model().name
    copy = tmp_path / "weights"
    shutil.copytree(SHIPPED_DIR, copy)
    with open(copy / name / embedded.WEIGHTS_FILE, "r+b") as weights:
        weights.seek(-4, os.SEEK_END)
        weights.write(b"\x00\x00\x80\x7f")
    monkeypatch.setattr(embedded, "SHIPPED_DIR", copy)
    embedded._verified.cache_clear()
    with pytest.raises(RuntimeError, match=rf"{name}.*not the ones recorded.*Reinstall trl-bapo.*make weights"):
        embedded_model()
    embedded._verified.cache_clear()
