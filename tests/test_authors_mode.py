"""The authors' code's rules (github waunx/BAPO_ICLR), each an option, through `trainer.train()`, against the rules
worked out by hand (docs/authors-parity.md lists where each comes from).

Group size G = 4, 4 prompts per rollout step in dataset order, one optimizer step per rollout step. Fixed thresholds:
c1 = 1/4 (0/4 and 1/4 are difficult) and the band [c2, c3] = [1/4, 1/2] (1/4 and 2/4), so 1/4 is in both, as 1/8 is
in the authors' [0, 1/8] and [1/8, 3/8].
"""

import json

import pytest
import torch
from conftest import (
    GROUP_SIZE,
    BatchRecorder,
    ScriptedReward,
    bapo_logs,
    batch_completion_logps,
    make_config,
    prompt_dataset,
)
from transformers import TrainerCallback

from trl_bapo import BAPOTrainer

# Correct completions of each prompt, the first time it is scored (fresh) and at its re-evaluations.
STEPS = [
    {"a=": [0, 4], "b=": [2], "c=": [1, 3], "d=": [4]},
    {"e=": [0, 1], "f=": [2], "g=": [2], "h=": [3]},
    {"i=": [0, 0], "j=": [0, 2], "k=": [4], "l=": [4]},
    {"m=": [1], "n=": [2], "o=": [4], "p=": [4]},
    {"q=": [3], "r=": [4], "s=": [4], "u=": [4]},
]

# The shared store holds 5 entries, at most 2 in the band once full, and "stale" means stored more than 1 step ago.
# Per step: what is trained, X1/X2/X3 and re-evaluations, and what the store holds after the step.
EXPECTED = [
    # X1 = b, c. The store takes a (0/4), b (2/4) and c (1/4, in both classes) at the end of the step.
    dict(trained={"b=", "c="}, x=(2, 0, 0), reevaluated=0, store=["a=", "b=", "c="]),
    # e enters after the update, so it is not re-evaluated yet; a (0 -> 4/4, all correct) and c (1/4 -> 3/4) beat
    # their entry accuracy and are admitted, the room of one group takes a. Storing g overfills the store: the band
    # holds b, f, g (three, over the cap of two), none stale, so the oldest, b, leaves.
    dict(trained={"f=", "g=", "h=", "a="}, x=(3, 1, 0), reevaluated=2, store=["a=", "c=", "e=", "f=", "g="]),
    # No fresh group is mixed: X1 falls back to the whole batch. Storing i and j overfills the store twice; a (now
    # 4/4) and c (now 3/4) are above both classes and leave first, though the difficult e is older.
    dict(trained={"i=", "j=", "k=", "l="}, x=(4, 0, 0), reevaluated=0, store=["e=", "f=", "g=", "i=", "j="]),
    # e (0 -> 1/4), i (0 -> 0) and j (0 -> 2/4) are re-evaluated; e and j join X2, and both now read as band
    # entries. Storing m (1/4) overfills the store: the band holds e, f, g, j, m; e, f and g, stored at step 2,
    # are stale and leave first.
    dict(trained={"m=", "n=", "e=", "j="}, x=(2, 2, 0), reevaluated=3, store=["i=", "j=", "m=", "n="]),
    # X3 fills the room of three with the band's entries j, m and n: j is a difficult prompt re-evaluated into the
    # band, replayed from its stored all-wrong rollout (advantage 0), though it is older than the window of 1.
    dict(trained={"q=", "j=", "m=", "n="}, x=(1, 0, 3), reevaluated=0, store=["i=", "j=", "m=", "n="]),
]


def test_shared_buffer_follows_the_authors_store(tiny_model_path, tmp_path):
    plan = {prompt: ks for step in STEPS for prompt, ks in step.items()}
    args = make_config(
        tmp_path,
        max_steps=len(STEPS),
        rollout_delay=1,
        reevaluation_interval=2,
        max_reevaluation_prompts=8,
        difficult_threshold=0.25,
        high_quality_lower_range=[0.25, 0.25],
        high_quality_upper_range=[0.5, 0.5],
        high_quality_buffer_steps=1,
        difficult_buffer_size=5,
        shared_buffer=True,
        high_quality_buffer_size=2,
        difficult_entry_after_update=True,
        difficult_admission="improved_or_solved",
        keep_reevaluated_prompts=True,
        cap_difficult_replay=True,
        online_filter_fallback=True,
        log_buffer_snapshots=True,
    )
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=ScriptedReward(plan), args=args, train_dataset=prompt_dataset(list(plan))
    )
    recorder = BatchRecorder(trainer)
    trainer.train()

    logs = bapo_logs(trainer)
    with open(tmp_path / "bapo_buffers.jsonl") as file:
        lines = [json.loads(line) for line in file]
    for t, (expected, log) in enumerate(zip(EXPECTED, logs, strict=True), start=1):
        assert set(recorder.per_step[t]) == expected["trained"], f"step {t}: {sorted(recorder.per_step[t])}"
        assert all(rows == GROUP_SIZE for rows in recorder.per_step[t].values())
        assert (log["bapo/x1"], log["bapo/x2"], log["bapo/x3"]) == expected["x"], f"step {t}"
        assert log["bapo/reevaluated"] == expected["reevaluated"], f"step {t}"
        held = [line for line in lines if line["step"] == t]
        assert [line["prompt"] for line in held] == expected["store"], f"step {t}"
        assert {line["buffer"] for line in held} == {"shared"}
    # The views the metrics count: B_bad, entries that entered at mu <= c1; B_high, entries whose latest accuracy is
    # in the band.
    assert [log["bapo/difficult_buffer"] for log in logs] == [2, 3, 3, 3, 3]
    assert [log["bapo/high_quality_buffer"] for log in logs] == [2, 2, 2, 3, 3]
    last = {line["prompt"]: line for line in lines if line["step"] == len(STEPS)}
    assert (last["j="]["accuracy"], last["j="]["latest"], last["j="]["reevaluated"]) == (0.0, 0.5, 1)
    assert last["j="]["replayed"] == 1 and last["i="]["latest"] == 0.0
    # The all-correct X2 group (a, step 2) and the replayed all-wrong rollout (j, step 5) train with advantage 0.
    tokenizer = trainer.processing_class
    for step, prompt in ((2, "a="), (5, "j=")):
        advantages = [
            inputs["advantages"][row]
            for t, inputs in recorder.inputs
            if t == step
            for row, ids in enumerate(inputs["prompt_ids"])
            if tokenizer.decode(ids[inputs["prompt_mask"][row].bool()]) == prompt
        ]
        assert len(advantages) == GROUP_SIZE and all(a == 0 for a in advantages), (step, prompt, advantages)


class OptimizerRecord(TrainerCallback):
    """The weights and Adam's state after every optimizer step."""

    def __init__(self, trainer):
        self.trainer, self.after = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        optimizer = self.trainer.optimizer
        adam = {
            name: {key: value.clone() for key, value in optimizer.state[param].items()}
            for name, param in self.trainer.model.named_parameters()
            if param in optimizer.state
        }
        weights = {name: param.detach().clone() for name, param in self.trainer.model.named_parameters()}
        self.after.append((weights, adam))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else same(a[k], b[k]) for k in a
    )


# Mixed groups per rollout step: 3, then 1 (an underfilled batch), then 4. Two optimizer steps per rollout step of
# two micro-batches of 4 rows each: a full optimizer step holds 8 rows, two groups.
AGGREGATION_STEPS = [[2, 1, 3, 0], [2, 0, 4, 4], [1, 2, 3, 2]]


def test_mini_batch_aggregation_takes_the_authors_steps(tiny_model_path, tmp_path):
    plan = {f"{t}{name}=": [k] for t, ks in enumerate(AGGREGATION_STEPS) for name, k in zip("abcd", ks)}
    args = make_config(
        tmp_path,
        max_steps=2 * len(AGGREGATION_STEPS),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        steps_per_generation=4,
        rollout_delay=1,
        use_difficult_replay=False,
        use_high_quality_replay=False,
        loss_type="dapo",
        batch_aggregation="mini_batch",
        learning_rate=5e-2,
    )
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=ScriptedReward(plan), args=args, train_dataset=prompt_dataset(list(plan))
    )
    record = OptimizerRecord(trainer)
    trainer.add_callback(record)
    checked = []
    compute_loss = trainer.compute_loss

    def checking_compute_loss(model, inputs, *a, **k):
        mask = inputs["completion_mask"].float()
        rows = int((mask.sum(dim=1) > 0).sum())
        loss = compute_loss(model, inputs, *a, **k)
        if rows:
            # The clipped surrogate, from a forward pass of the test's own, against the behavior log-probs TRL
            # measured when the batch was generated; its token mean times rows / (per_device_train_batch_size x
            # gradient_accumulation_steps) is the authors' micro-batch loss.
            ratio = torch.exp(batch_completion_logps(trainer.model, inputs) - inputs["old_per_token_logps"])
            advantages = inputs["advantages"].unsqueeze(1)
            surrogate = -torch.min(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
            expected = (surrogate * mask).sum() / mask.sum() * rows / 8
            torch.testing.assert_close(loss.detach(), expected, atol=1e-6, rtol=1e-5)
        checked.append(rows)
        return loss

    trainer.compute_loss = checking_compute_loss
    trainer.train()

    assert [log["bapo/optimizer_steps"] for log in bapo_logs(trainer) if "bapo/optimizer_steps" in log] == [2, 1, 2]
    # Rows per micro-batch: 12 rows fill one step (4 + 4) and half the next (2 + 2); 4 rows half a step, and the
    # second step has none; 16 rows fill both.
    assert checked == [4, 4, 2, 2, 2, 2, 0, 0, 4, 4, 4, 4]
    weights, adam = zip(*record.after)
    # The skipped step (the fourth) changes neither the weights nor Adam's moments and step count.
    assert same(weights[3], weights[2]) and same(adam[3], adam[2])
    assert not same(weights[2], weights[1]) and not same(weights[4], weights[3]), "the other steps train"


@pytest.mark.parametrize("phase", [0, 1])
def test_refresh_phase_decides_which_steps_refresh_alpha(tiny_model_path, tmp_path, phase):
    """With v = 2, Algorithm 1 refreshes at t mod v == 0 (t = 2, 4) and the authors' code at (t - 1) mod v == 0
    (t = 1, 3, 5); both take alpha at the first step."""
    plan = {f"{t}{name}=": [k] for t in range(5) for name, k in zip("abcd", [1, 2, 3, 0])}
    args = make_config(tmp_path, max_steps=5, rollout_delay=2, rollout_refresh_phase=phase, use_difficult_replay=False)
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=ScriptedReward(plan), args=args, train_dataset=prompt_dataset(list(plan))
    )
    trainer.train()
    lags = [log["bapo/policy_lag"] for log in bapo_logs(trainer)]
    assert lags == ([0, 0, 1, 0, 1] if phase == 0 else [0, 1, 0, 1, 0])
    assert trainer.bapo_status.rollout_policy_step == (4 if phase == 0 else 5)
