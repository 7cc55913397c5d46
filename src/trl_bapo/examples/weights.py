"""`make weights`: builds the embedded default's warm-started models once and writes them into the package.

The warm start is 1500 supervised steps; across CPU kernel paths (ATen's AVX2 or AVX-512 code, MKL's instruction
set, the thread count) its rounding differs, and the model it ends on differs by a factor of four in accuracy
(README, "The embedded default"). So the models are built once, here, and shipped: every machine then starts from
the same weights, and evaluating them gives the same accuracy on every kernel path. This script is the way to make
them again (after a change to the tiny model or its warm start): it builds each shipped model, measures its held-out
accuracy, and records both with the machine it ran on in `trl_bapo/builtin/weights/manifest.json`.

    python -m trl_bapo.examples.weights            # every shipped model
    python -m trl_bapo.examples.weights --only tiny-carry-h128-l4-steps1500-seed0
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from trl_bapo.builtin.embedded import (
    BAND,
    EVAL_SAMPLES,
    SHIPPED,
    SHIPPED_DIR,
    embedded_datasets,
    kernel_path,
    model_name,
    warm_start_pairs,
    weights_sha256,
)
from trl_bapo.builtin.rewards import load_reward
from trl_bapo.builtin.tiny import build_tiny_model, load_tiny_model
from trl_bapo.examples.callbacks import quiet_libraries
from trl_bapo.examples.evaluation import evaluate_policy


def base_accuracy(path: Path, task: str) -> dict[str, float]:
    """Held-out mean@8 at temperature 1 (evaluation seed 0) and greedy accuracy, as `make demo` measures them."""
    _, heldout = embedded_datasets(task)
    result = evaluate_policy(
        load_tiny_model(path), AutoTokenizer.from_pretrained(path), list(heldout), [], load_reward(task), EVAL_SAMPLES
    )
    return {"mean_at_8": result["heldout"], "greedy": result["greedy"]}


def build_shipped(task: str, warm_start_steps: int, seed: int = 0) -> dict:
    """Builds one shipped model into the package and returns its manifest entry."""
    name = model_name(task, seed, warm_start_steps)
    with tempfile.TemporaryDirectory() as scratch:
        built = build_tiny_model(
            Path(scratch) / name,
            seed=seed,
            warm_start_pairs=warm_start_pairs(task, seed),
            warm_start_steps=warm_start_steps,
            **SHIPPED[name]["size"],
        )
        target = SHIPPED_DIR / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(built, target)
    accuracy = base_accuracy(target, task)
    return {
        "sha256": weights_sha256(target),
        "base_heldout": accuracy,
        "built_on": kernel_path(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(SHIPPED), help="default: every shipped model")
    options = parser.parse_args(argv)
    quiet_libraries()
    manifest_path = SHIPPED_DIR / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for name in options.only or sorted(SHIPPED):
        spec = SHIPPED[name]
        entry = build_shipped(spec["task"], spec["warm_start_steps"], spec["seed"])
        manifest[name] = {**{k: v for k, v in spec.items() if k != "size"}, **entry}
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        accuracy = entry["base_heldout"]["mean_at_8"]
        where = "inside" if BAND[0] <= accuracy <= BAND[1] else "OUTSIDE"
        print(f"{name}: base held-out mean@8 {accuracy:.3f} ({where} the band {BAND}), sha256 {entry['sha256'][:12]}")


if __name__ == "__main__":
    main()
