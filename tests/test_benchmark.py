"""The bench harness end to end for a few steps, on the embedded (warm-started) model."""

import dataclasses
import json
import os

import pytest

from trl_bapo.builtin.embedded import PROMPTS_PER_STEP, shipped_manifest
from trl_bapo.examples import benchmark, overlap_bench

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
            "--regimes",
            "carry",
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
    # What the runs started from and how this machine computed, recorded with the results.
    shipped = shipped_manifest()[result["model"]["model"]]
    assert result["model"]["weights_sha256"] == shipped["sha256"]
    assert {"cpu_capability", "torch_threads", "cpu_flags"} <= set(result["model"])
    assert all(
        record["kernel_path"]["cpu_capability"] == result["model"]["cpu_capability"] for record in saved["records"]
    )
    for record in result["records"]:
        assert RECORD_KEYS <= set(record)
        assert record["steps"] == 2 and record["learning_rate"] == benchmark.TRAINING["learning_rate"]
        assert record["rollouts"] >= 2 * PROMPTS_PER_STEP * benchmark.GROUP_SIZE
        assert record["task"] == "carry" and record["updates_per_rollout"] == 1
        assert 0 <= record["eval_accuracy"] <= 1 and 0 <= record["unlock_rate"] <= 1
        assert 0 < record["effective_rollout_ratio"] <= 1.5
        assert record["peak_rss_mib"] > 100  # the run's own process: torch and the model at least
        assert record["heldout_curve"][0] == [0, 0, record["base_eval_accuracy"]]
    report = (tmp_path / "RESULTS.md").read_text()
    assert "| grpo |" in report and "| bapo |" in report and "Sanity gate" in report
    assert (tmp_path / "DIFFICULTY.md").read_text().startswith("| difficulty |")
    for plot in ("heldout.png", "composition.png", "accuracy_bins.png"):
        assert (tmp_path / plot).stat().st_size > 0


def test_the_sweep_runs_as_make_sweep_calls_it_in_the_carry_regime_alone(tmp_path, monkeypatch):
    # `make sweep` passes neither --seeds nor --regimes: the sweep took the first of no seeds, and swept the paper
    # regime too, which reads the carry regime's rates. One method at one rate and no loss option keep it short.
    monkeypatch.setattr(benchmark, "SWEPT_METHODS", ("grpo",))
    monkeypatch.setattr(benchmark, "SWEEP_RATES", (8e-4,))
    monkeypatch.setattr(benchmark, "LOSS_OPTIONS", ())
    result = benchmark.main(["--sweep", "--steps", "2", "--output-dir", str(tmp_path), "--tracked-prompts", "16"])
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["rates"] == result["rates"] == {"grpo": 8e-4} and saved["best_loss"] is None
    assert [(r["method"], r["seed"], r["steps"], r["task"]) for r in saved["runs"]] == [("grpo", 0, 2, "carry")]
    assert saved["model"]["weights_sha256"] == shipped_manifest()[saved["model"]["model"]]["sha256"]
    assert (tmp_path / "SWEEP.md").read_text().startswith("# Learning-rate sweep, carry regime")
    assert not (tmp_path / "paper").exists()


def test_the_sweep_is_refused_outside_the_carry_regime(tmp_path):
    with pytest.raises(SystemExit):
        benchmark.main(["--sweep", "--regimes", "paper", "--output-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_the_server_rule_reuses_only_the_runs_asked_for(tmp_path):
    # GRPO's rule runs on file for every candidate, none passing: nothing runs, no server starts, the summary says
    # none was chosen; runs on file with other seeds than asked for are refused, never taken for them.
    for candidate in overlap_bench.SERVER_CANDIDATES:
        records = [
            {
                "method": "grpo",
                "seed": seed,
                "steps": 300,
                "learning_rate": candidate.learning_rate,
                "lora": candidate.lora,
            }
            for seed in (0, 1, 2)
        ]
        rule = tmp_path / "overlap-target-server" / candidate.name / "rule"
        rule.mkdir(parents=True)
        gate = {"grpo_gain": 0.01, "grpo_seed_stdev": 0.01, "passed": False}
        (rule / "results.json").write_text(json.dumps({"gate": gate, "records": records}))
    cores = os.sched_getaffinity(0)
    summary = overlap_bench.main(["--target-server", "--rule-only", "--output-dir", str(tmp_path)])
    assert os.sched_getaffinity(0) == cores  # pinned to one core only where a run is due
    assert summary["chosen"] is None and len(summary["candidates"]) == len(overlap_bench.SERVER_CANDIDATES)
    assert "GRPO passed the gate on no candidate" in (tmp_path / "OVERLAP.md").read_text()
    with pytest.raises(ValueError, match="holds other runs"):
        overlap_bench.main(["--target-server", "--seeds", "0", "1", "--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="at least two"):
        overlap_bench.main(["--target-server", "--seeds", "0", "--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="one significant digit"):
        overlap_bench.Candidate(8, 1.5e-3)


def test_bench_harness_runs_the_paper_regime(tmp_path, monkeypatch):
    """4 updates on one rollout batch of 32 prompts, GRPO against BAPO's decoupled variant, paired by seed. The
    regime's own task is swapped for the carry model the other tests build (the runs get the regime itself)."""
    paper = dataclasses.replace(
        benchmark.REGIMES["paper"], task="carry", warm_start_steps=1500, eval_every=2, candidates=()
    )
    monkeypatch.setitem(benchmark.REGIMES, "paper", paper)
    result = benchmark.main(
        ["--regimes", "paper", "--methods", "grpo", "bapo_decoupled", "--seeds", "0", "1", "--steps", "4"]
        + ["--output-dir", str(tmp_path), "--tracked-prompts", "16"]
    )
    records = result["records"]
    assert [(r["method"], r["seed"]) for r in records] == [
        ("grpo", 0),
        ("bapo_decoupled", 0),
        ("grpo", 1),
        ("bapo_decoupled", 1),
    ]
    for record in records:
        assert record["updates_per_rollout"] == 4 and record["regime"] == "paper"
        assert record["rollouts"] >= 32 * benchmark.GROUP_SIZE
        assert len(record["heldout_curve"]) == 3  # the base model, then after 2 and 4 optimizer steps
    assert "bapo/x1/is_weight_mean" in records[1]["bapo_means"]
    report = (tmp_path / "paper" / "RESULTS.md").read_text()
    assert "Gains paired by seed against GRPO" in report and "| bapo_decoupled | 2 |" in report

    # A method run apart (another process, another core) merges into the same report, paired on the same seeds. The
    # authors' settings override a shared one (beta 0).
    benchmark.main(
        ["--regimes", "paper", "--methods", "bapo_authors", "--seeds", "0", "1", "--steps", "4"]
        + ["--output-dir", str(tmp_path / "apart"), "--tracked-prompts", "16"]
    )
    merged = benchmark.main(
        ["--regimes", "paper", "--merge", str(tmp_path / "paper"), str(tmp_path / "apart" / "paper")]
        + ["--output-dir", str(tmp_path / "merged")]
    )
    assert [(r["method"], r["seed"]) for r in merged["records"]] == [(r["method"], r["seed"]) for r in records] + [
        ("bapo_authors", 0),
        ("bapo_authors", 1),
    ]
    report = (tmp_path / "merged" / "paper" / "RESULTS.md").read_text()
    assert "| bapo_authors | 2 |" in report and "| bapo_decoupled | 2 |" in report


def test_paper_task_rule_runs_grpo_alone_first_and_compares_nothing_when_no_candidate_passes(tmp_path, monkeypatch):
    """The rule with one candidate that meets the share (the threshold set to 0 here): GRPO runs on every seed, fails
    the gate in 2 steps, and no BAPO variant runs."""
    paper = dataclasses.replace(benchmark.REGIMES["paper"], eval_every=2, candidates=(("carry", 1500),))
    monkeypatch.setitem(benchmark.REGIMES, "paper", paper)
    monkeypatch.setattr(benchmark, "ZERO_VARIANCE_SHARE", 0.0)
    result = benchmark.main(
        ["--regimes", "paper", "--methods", "grpo", "bapo", "--seeds", "0", "1", "--steps", "2"]
        + ["--output-dir", str(tmp_path), "--tracked-prompts", "16"]
    )
    assert result["records"] == []
    assert "No candidate task met the rule" in (tmp_path / "paper" / "RESULTS.md").read_text()
    table = (tmp_path / "paper" / "DIFFICULTY.md").read_text()
    assert "| carry | 1500 |" in table and "| failed |" in table
    assert sorted(p.name for p in (tmp_path / "paper" / "runs").iterdir()) == ["grpo-0", "grpo-1"]
