"""The bench harness end to end for a few steps, on the embedded (warm-started) model."""

import json

from trl_bapo.examples import benchmark

RECORD_KEYS = {
    "method",
    "seed",
    "task",
    "steps",
    "rollouts",
    "wall_seconds",
    "eval_accuracy",
    "base_eval_accuracy",
    "eval_accuracy_greedy",
    "unlock_rate",
    "relock_rate",
    "learning_rate",
    "effective_rollout_ratio",
    "zero_std_fraction",
    "batch_fill",
    "peak_rss_mib",
    "heldout_curve",
}


def test_bench_harness_runs_grpo_and_bapo(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "EVAL_EVERY", 2)  # read in this process: the runs' own processes keep 25
    result = benchmark.main(
        [
            "--methods",
            "grpo",
            "bapo",
            "--seeds",
            "0",
            "--steps",
            "2",
            "--output-dir",
            str(tmp_path),
            "--tracked-prompts",
            "16",
        ]
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == result and len(result["records"]) == 2
    assert {"grpo_gain", "grpo_seed_stdev", "passed"} <= set(result["gate"])
    for record in result["records"]:
        assert RECORD_KEYS <= set(record)
        assert record["steps"] == 2 and record["learning_rate"] == benchmark.TRAINING["learning_rate"]
        assert record["rollouts"] >= 2 * benchmark.PROMPTS_PER_STEP * benchmark.GROUP_SIZE
        assert 0 <= record["eval_accuracy"] <= 1 and 0 <= record["unlock_rate"] <= 1
        assert 0 < record["effective_rollout_ratio"] <= 1.5
        assert record["peak_rss_mib"] > 100  # the run's own process: torch and the model at least
        assert record["heldout_curve"][0] == [0, 0, record["base_eval_accuracy"]]
    report = (tmp_path / "RESULTS.md").read_text()
    assert "| grpo |" in report and "| bapo |" in report and "Sanity gate" in report
    assert (tmp_path / "DIFFICULTY.md").read_text().startswith("| difficulty |")
    for plot in ("heldout.png", "composition.png", "accuracy_bins.png"):
        assert (tmp_path / plot).stat().st_size > 0
