"""Numeric parity with verl 0.9.1, the library the authors' BAPO forks: the same tensors through trl-bapo's real code
path and through verl's functions (tests/verl_reference.py, run in `.venv-verl`, which `make test` builds), within
1e-6.

- The decoupled loss (`off_policy_correction="decoupled"`, TRL's 'dapo' loss with epsilon 0.2 / 0.28 and `delta` 10):
  trl-bapo cuts the batch (`batch.cut_batch`), measures the anchor and the truncated importance weight
  (`finish_behavior_logps`) and computes each micro-batch's loss (`BAPOTrainer.compute_loss`, TRL's `_compute_loss`
  inside); verl computes `compute_rollout_correction_weights` (token level, truncated at 3) and
  `compute_policy_loss_vanilla` with those weights and dual clip 10. Loss values and the gradient with respect to
  the current policy's log-probs must agree.
- Aggregation: `batch_aggregation="spread"` against verl 0.9.1's token mean over a mini-batch (one optimizer step of
  two micro-batches), and `batch_aggregation="mini_batch"` against the authors' fork's rule (each micro-batch's own
  token mean times its rows over the mini-batch's rows per GPU) over an underfilled batch of two optimizer steps.
- GRPO's advantage: TRL's (`_generate_and_score_completions` on real generations, scripted rewards) against verl's
  `compute_grpo_outcome_advantage`.

Where verl's functions and the fork differ, the tests pin verl 0.9.1's functions and keep to the inputs on which the
two agree (docs/authors-parity.md): verl clamps the log-ratio to [-20, 20] before exponentiating (the fork does not;
every log-ratio here is within 2), the fork passes a `clip_center` that it then overwrites with 1 for every row (so
the clip is verl's 1 - eps_low, 1 + eps_high), and verl 0.9.1's token mean divides by the mini-batch's tokens where
the fork's dp_actor divides each micro-batch by its own and scales it by rows: the fork's rule is rebuilt from verl's
`agg_loss` without global counts, which is the fork's `masked_mean`, and the fork's line 475.
"""

import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import make_config, prompt_dataset

from trl_bapo import BAPOTrainer
from trl_bapo.batch import cut_batch, masked_row
from trl_bapo.behavior import finish_behavior_logps
from trl_bapo.correction import IMPORTANCE_WEIGHT, SOURCE
from trl_bapo.losses import LOSSES

ROOT = Path(__file__).resolve().parents[1]
VERL_PYTHON = Path(os.environ.get("TRL_BAPO_VERL_PYTHON", ROOT / ".venv-verl" / "bin" / "python"))
TOLERANCE = dict(atol=1e-6, rtol=0)
# The authors' run script: clip [0.8, 1.28], dual clip 10, token-level truncation of the importance weight at 3.
CLIP = dict(epsilon=0.2, epsilon_high=0.28, delta=10.0, importance_sampling_cap=3.0)


def verl(cases: list[dict], tmp_path: Path) -> list[dict]:
    """verl's results for `cases`, computed in verl's own environment."""
    if not VERL_PYTHON.exists():
        pytest.fail(f"{VERL_PYTHON} is missing: run `make install-verl` (make test builds it) to compare with verl.")
    cases_path, results_path = tmp_path / "cases.pt", tmp_path / "results.pt"
    torch.save(cases, cases_path)
    run = subprocess.run(
        [str(VERL_PYTHON), str(ROOT / "tests" / "verl_reference.py"), str(cases_path), str(results_path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-5000:]
    return torch.load(results_path, weights_only=True)


class FixedLogps:
    """Stands in for TRL's forward (`_get_per_token_logps_and_entropies`, the one method trl-bapo's and TRL's loss
    code read log-probs from) with given per-token log-probs. A row is named by its first prompt token, so the
    table follows rows wherever the batch is cut, padded or filled."""

    def __init__(self, trainer):
        self.table = None
        trainer._get_per_token_logps_and_entropies = self

    def __call__(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        logps = self.table[input_ids[:, 0]]
        return logps, torch.zeros_like(logps.detach()), None


def scored_batch(rows: int, width: int, generator: torch.Generator) -> tuple[dict, dict]:
    """A scored batch as TRL returns it (X1 rows, and a third replayed from X3), and its three policies' per-token
    log-probs: behavior (alpha), anchor (pi_start) and current, with ratios past the clip, the dual clip and the
    truncation."""
    lengths = torch.randint(1, width + 1, (rows,), generator=generator)
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    behavior = -torch.rand(rows, width, generator=generator, dtype=torch.float64) * 3 - 0.05
    anchor = behavior + torch.randn(rows, width, generator=generator, dtype=torch.float64) * 0.6
    current = anchor + torch.randn(rows, width, generator=generator, dtype=torch.float64) * 0.4
    current[0, 0] = anchor[0, 0] + 2.5  # ratio 12 > the dual clip
    advantages = torch.randn(rows, generator=generator, dtype=torch.float64)
    advantages[0] = -abs(advantages[0])
    batch = {
        "prompt_ids": torch.stack([torch.arange(rows), torch.full((rows,), 5)], dim=1),
        "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
        "completion_ids": torch.randint(3, 20, (rows, width), generator=generator),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": behavior.clone(),
        SOURCE: torch.tensor([1, 1, 3] * (rows // 3)),
    }
    batch["num_items_in_batch"] = mask.sum()
    return batch, {"behavior": behavior, "anchor": anchor, "current": current}


def decoupled_trainer(tiny_model_path, output_dir, **overrides) -> tuple[BAPOTrainer, FixedLogps]:
    args = make_config(
        output_dir, off_policy_correction="decoupled", loss_type="dapo", beta=0.0, rollout_delay=2, **CLIP, **overrides
    )
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=args,
        train_dataset=prompt_dataset(["a="] * 6),  # never trained on; as many rows as a rollout batch's prompts
    )  # fmt: skip
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    return trainer, FixedLogps(trainer)


def cut(trainer: BAPOTrainer, batch: dict, filler: dict) -> tuple[list[dict], list[bool]]:
    """The micro-batches of one process, as the trainer cuts an assembled batch, and the optimizer steps skipped."""
    normalisation, pad = LOSSES[trainer.loss_type].normalisation, trainer._tokenizer.pad_token_id
    return cut_batch(batch, trainer.args, 1, normalisation, filler, pad)


def trl_bapo_loss(trainer: BAPOTrainer, forward: FixedLogps, batch: dict, policies: dict) -> dict:
    """The micro-batches of one rollout step as trl-bapo cuts them, their anchors and importance weights as it
    measures them, and their losses summed, with the gradient with respect to the current log-probs."""
    filler = masked_row(batch)
    forward.table = policies["anchor"]
    chunks, skipped = cut(trainer, batch, filler)
    chunks = [finish_behavior_logps(trainer, chunk) for chunk in chunks]
    current = policies["current"].clone().requires_grad_(True)
    forward.table = current
    total = sum(trainer.compute_loss(trainer.model, chunk) for chunk in chunks)
    total.backward()
    micro_batches = [
        chunk["prompt_ids"][chunk["completion_mask"].sum(dim=1) > 0, 0].tolist() for chunk in chunks
    ]  # the rows each holds, by name
    weights = torch.zeros_like(policies["anchor"])
    for chunk in chunks:
        real = chunk["completion_mask"].sum(dim=1) > 0
        weights[chunk["prompt_ids"][real, 0]] = chunk[IMPORTANCE_WEIGHT][real].double()
    return {
        "loss": total.detach(),
        "grad": current.grad,
        "micro_batches": micro_batches,
        "weights": weights,
        "skipped": skipped,
    }


def verl_case(kind: str, batch: dict, policies: dict, micro_batches: list[list[int]], **extra) -> dict:
    return {
        "kind": kind,
        "group_size": 4,
        "clip_low": CLIP["epsilon"],
        "clip_high": CLIP["epsilon_high"],
        "clip_c": CLIP["delta"],
        "threshold": CLIP["importance_sampling_cap"],
        "old_log_prob": policies["anchor"],
        "log_prob": policies["current"],
        "log_ratio": policies["anchor"] - policies["behavior"],
        "advantages": batch["advantages"].unsqueeze(1).expand_as(policies["anchor"]).contiguous(),
        "mask": batch["completion_mask"].double(),
        "micro_batches": micro_batches,
        **extra,
    }


def test_decoupled_loss_and_spread_aggregation_match_verl(tiny_model_path, tmp_path):
    """One optimizer step of two micro-batches: verl 0.9.1's token mean over the mini-batch."""
    trainer, forward = decoupled_trainer(
        tiny_model_path, tmp_path, per_device_train_batch_size=6, gradient_accumulation_steps=2, steps_per_generation=2
    )
    batch, policies = scored_batch(12, 6, torch.Generator().manual_seed(0))
    ours = trl_bapo_loss(trainer, forward, batch, policies)
    assert [len(rows) for rows in ours["micro_batches"]] == [6, 6]
    weights_case = verl_case("rollout_weights", batch, policies, ours["micro_batches"])
    theirs_weights = verl([weights_case], tmp_path)[0]["weights"]
    loss_case = verl_case("policy_loss", batch, policies, ours["micro_batches"], weights=theirs_weights)
    theirs = verl([loss_case], tmp_path)[0]
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(ours["weights"][mask], theirs_weights[mask], **TOLERANCE)
    assert (theirs_weights[mask] == 3.0).any() and (theirs_weights[mask] < 1).any(), "no truncation to compare"
    torch.testing.assert_close(ours["loss"], theirs["loss"], **TOLERANCE)
    torch.testing.assert_close(ours["grad"], theirs["grad"], **TOLERANCE)
    assert ours["grad"][0, 0] == 0 and theirs["grad"][0, 0] == 0, "the dual clip cut no token"


def test_mini_batch_aggregation_matches_the_authors_fork(tiny_model_path, tmp_path):
    """An underfilled batch of 12 rows where a full optimizer step holds 8 (two micro-batches of 4): the first step
    takes 8 rows, the second 4, each micro-batch's token mean weighed by its rows over 8."""
    trainer, forward = decoupled_trainer(
        tiny_model_path,
        tmp_path,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        steps_per_generation=6,
        batch_aggregation="mini_batch",
    )
    batch, policies = scored_batch(12, 6, torch.Generator().manual_seed(1))
    ours = trl_bapo_loss(trainer, forward, batch, policies)
    assert [len(rows) for rows in ours["micro_batches"]] == [4, 4, 2, 2, 0, 0]
    assert ours["skipped"] == [False, False, True]
    rows = [rows for rows in ours["micro_batches"] if rows]
    weights = verl([verl_case("rollout_weights", batch, policies, rows)], tmp_path)[0]["weights"]
    theirs = verl([verl_case("fork_aggregation", batch, policies, rows, weights=weights, mini_batch_rows=8)], tmp_path)
    torch.testing.assert_close(ours["loss"], theirs[0]["loss"], **TOLERANCE)
    torch.testing.assert_close(ours["grad"], theirs[0]["grad"], **TOLERANCE)


# Rewards of six groups of 8: one right; half right; none; all; graded rewards; all but one.
REWARDS = [
    [1, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 0, 0],
    [0] * 8,
    [1] * 8,
    [0.5, 0, 1, 0.25, 0, 0, 0.75, 0],
    [1, 1, 1, 1, 1, 1, 1, 0],
]


def test_grpo_advantage_matches_verl(tiny_model_path, tmp_path):
    """TRL's advantages equal verl's with TRL's std epsilon (1e-4); with verl's own (1e-6) they differ by at most
    3e-4 relative for 0/1 rewards of 8 completions (a smallest non-zero std of 0.35)."""
    flat = [float(r) for group in REWARDS for r in group]
    prompts = [f"{g}=" for g in range(len(REWARDS))]

    def reward(completions, **kwargs):
        return flat[: len(completions)]

    args = make_config(
        tmp_path, num_generations=8, per_device_train_batch_size=len(flat), gradient_accumulation_steps=1
    )
    trainer = BAPOTrainer(model=tiny_model_path, reward_funcs=reward, args=args, train_dataset=prompt_dataset(prompts))
    trainer.model.train()
    inputs = [{"prompt": prompt} for prompt in prompts for _ in range(8)]
    ours = trainer._generate_and_score_completions(inputs)["advantages"].double()
    index = [g for g in range(len(REWARDS)) for _ in range(8)]
    rewards = torch.tensor(flat, dtype=torch.float64)
    cases = [{"kind": "advantage", "rewards": rewards, "index": index, "epsilon": eps} for eps in (1e-4, None)]
    with_trl_epsilon, with_verl_epsilon = (result["advantages"] for result in verl(cases, tmp_path))
    torch.testing.assert_close(ours, with_trl_epsilon, **TOLERANCE)
    relative = ((ours - with_verl_epsilon).abs() / with_verl_epsilon.abs().clamp(min=1e-12))[with_verl_epsilon != 0]
    assert 0 < relative.max() <= 3e-4, relative.max()


def test_the_reference_is_verl_itself(tmp_path):
    """The reference is verl's installed package, not a copy, in an environment that cannot see trl-bapo."""
    if not VERL_PYTHON.exists():
        pytest.fail(f"{VERL_PYTHON} is missing: run `make install-verl`.")
    probe = "from importlib.metadata import version; import importlib.util as u; "
    probe += "print(version('verl'), u.find_spec('trl_bapo') is None, u.find_spec('trl') is None)"
    run = subprocess.run([str(VERL_PYTHON), "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert run.stdout.split() == ["0.9.1", "True", "True"], run.stdout + run.stderr
