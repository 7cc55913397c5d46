"""The bench harness end to end for two steps of one method, on the embedded (warm-started) model."""

import json

from trl_bapo import benchmark

RECORD_KEYS = {"method", "seed", "task", "steps", "rollouts", "wall_seconds", "eval_accuracy",
               "eval_accuracy_greedy", "unlock_rate", "relock_rate", "zero_std_fraction", "batch_fill", "peak_rss_mib"}


def test_bench_harness_runs_two_steps_of_bapo(tmp_path):
    records = benchmark.main(
        ["--methods", "bapo", "--seeds", "0", "--steps", "2", "--output-dir", str(tmp_path), "--tracked-prompts", "16"]
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == records and len(records) == 1
    record = records[0]
    assert RECORD_KEYS <= set(record)
    assert record["method"] == "bapo" and record["steps"] == 2
    assert record["rollouts"] >= 2 * benchmark.PROMPTS_PER_STEP * benchmark.GROUP_SIZE
    assert 0 <= record["eval_accuracy"] <= 1 and 0 <= record["unlock_rate"] <= 1
    assert record["peak_rss_mib"] > 100  # the run's own process: torch and the model at least
    report = (tmp_path / "RESULTS.md").read_text()
    assert "| bapo |" in report
    assert (tmp_path / "reward.png").stat().st_size > 0 and (tmp_path / "composition.png").stat().st_size > 0
