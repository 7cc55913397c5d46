"""X1/X2/X3 membership through `trainer.train()`, against Algorithm 1 worked out by hand.

Group size G = 4 and 4 prompts per rollout step, in dataset order. Thresholds are fixed: c1 = 1/4 (0/4 and
1/4 are difficult), c2 = 1/2 and c3 = 3/4 (2/4 and 3/4 are high quality). |B_bad| = 3, re-evaluation every
m = 3 steps of at most 2 prompts, B_high keeps 2 steps. The plan gives each prompt's number of correct
completions the first time it is scored (fresh) and the second time (re-evaluation).
"""

from conftest import GROUP_SIZE, BatchRecorder, ScriptedReward, bapo_logs, make_config, prompt_dataset

from trl_bapo import BAPOTrainer

STEPS = [
    {"a=": [0, 0], "b=": [4], "c=": [2], "d=": [1, 0]},
    {"e=": [0, 2], "f=": [3], "g=": [2], "h=": [4]},
    {"i=": [0, 0], "j=": [0, 0], "k=": [4], "l=": [2]},
    {"m=": [1, 4], "n=": [2], "o=": [4], "p=": [0, 3]},
    {"q=": [3], "r=": [3], "s=": [3], "t=": [2]},
    {"u=": [0, 0], "v=": [4], "w=": [4], "x=": [4]},
]

# Per step: X1 (fresh, 1/4..3/4), X2 (re-evaluated and now 1/4 < mu < 1), X3 candidates and count,
# the prompts re-evaluated, and buffer sizes after the step.
EXPECTED = [
    dict(x1={"c=", "d="}, x2=set(), x3_from=set(), x3=0, reevaluated=set(), bad=2, high=1),
    dict(x1={"f=", "g="}, x2=set(), x3_from={"c="}, x3=1, reevaluated=set(), bad=3, high=3),
    # B_bad was [a, d, e]; i and j push a and d out (FIFO, capacity 3); the two oldest, e and i, are
    # re-evaluated (j is beyond max_reevaluation_prompts); e improved to 2/4 and joins X2.
    dict(x1={"l="}, x2={"e="}, x3_from={"c=", "f=", "g="}, x3=2, reevaluated={"e=", "i="}, bad=2, high=4),
    # Recency: c (step 1) is older than 2 steps and can no longer be drawn.
    dict(x1={"m=", "n="}, x2=set(), x3_from={"f=", "g=", "l="}, x3=2, reevaluated=set(), bad=3, high=4),
    # X1 fills the batch: no room for X3.
    dict(x1={"q=", "r=", "s=", "t="}, x2=set(), x3_from=set(), x3=0, reevaluated=set(), bad=3, high=6),
    # B_bad [j, m, p] + u -> [m, p, u]; m is now solved (4/4: not X2, leaves B_bad), p improved to 3/4.
    dict(x1=set(), x2={"p="}, x3_from={"n=", "q=", "r=", "s=", "t="}, x3=3, reevaluated={"m=", "p="}, bad=1, high=5),
]


def test_batch_membership_follows_algorithm_1(tiny_model_path, tmp_path):
    plan = {prompt: ks for step in STEPS for prompt, ks in step.items()}
    reward = ScriptedReward(plan)
    args = make_config(
        tmp_path,
        max_steps=len(STEPS),
        rollout_delay=1,
        reevaluation_interval=3,
        max_reevaluation_prompts=2,
        difficult_threshold=0.25,
        difficult_buffer_size=3,
        high_quality_lower_range=[0.5, 0.5],
        high_quality_upper_range=[0.75, 0.75],
        high_quality_buffer_steps=2,
    )
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=reward, args=args, train_dataset=prompt_dataset(list(plan))
    )
    recorder = BatchRecorder(trainer)
    trainer.train()

    logs = bapo_logs(trainer)
    assert len(logs) == len(STEPS)
    reevaluations = [call for call in reward.calls if all(n > 0 for n in call["scored"].values())]
    # Re-evaluation happens only at t mod m == 0 (t = 3 and 6, i.e. global steps 2 and 5 when they run).
    assert [call["step"] for call in reevaluations] == [2, 5]
    rollouts = 0
    for t, (expected, log) in enumerate(zip(EXPECTED, logs), start=1):
        trained = recorder.per_step[t]
        assert all(rows == GROUP_SIZE for rows in trained.values()), f"step {t}: partial group {trained}"
        x3 = set(trained) - expected["x1"] - expected["x2"]
        assert expected["x1"] | expected["x2"] <= set(trained), f"step {t}: trained {sorted(trained)}"
        assert x3 <= expected["x3_from"], f"step {t}: X3 drew {x3}, allowed {expected['x3_from']}"
        assert len(x3) == expected["x3"], f"step {t}: |X3| = {len(x3)}"
        assert log["bapo/x1"] == len(expected["x1"])
        assert log["bapo/x2"] == len(expected["x2"])
        assert log["bapo/x3"] == expected["x3"]
        assert log["bapo/x3"] <= 4 - log["bapo/x1"] - log["bapo/x2"]
        assert log["bapo/batch_fill"] == len(trained) / 4
        assert log["bapo/difficult_buffer"] == expected["bad"], f"step {t}"
        assert log["bapo/high_quality_buffer"] == expected["high"], f"step {t}"
        assert log["bapo/reevaluated"] == len(expected["reevaluated"])
        rollouts += 4 * GROUP_SIZE + len(expected["reevaluated"]) * GROUP_SIZE
        assert log["bapo/rollouts"] == rollouts
    assert [set(call["scored"]) for call in reevaluations] == [{"e=", "i="}, {"m=", "p="}]


# The authors' X2 rules (docs/authors-parity.md): c1 = 1/4; a re-evaluated prompt joins X2 when its accuracy beats
# the one it entered B_bad with and stays below 1; re-evaluated prompts stay in B_bad; X2 is capped to the room X1
# leaves. Per prompt: correct completions at each scoring.
AUTHORS_PLAN = {
    **{"a=": [0, 1, 2], "b=": [1, 2, 2], "i=": [0, 4, 4], "c=": [2]},
    **{"e=": [2], "f=": [3], "g=": [2], "h=": [4]},
    **{"j=": [0, 1], "k=": [4], "l=": [4], "m=": [4]},
    **{"n=": [4], "o=": [4], "p=": [4], "q=": [4]},
}


def test_authors_difficult_replay_rules(tiny_model_path, tmp_path):
    reward = ScriptedReward(AUTHORS_PLAN)
    args = make_config(
        tmp_path,
        max_steps=4,
        rollout_delay=1,
        reevaluation_interval=2,
        difficult_threshold=0.25,
        use_high_quality_replay=False,
        difficult_admission="improved",
        keep_reevaluated_prompts=True,
        cap_difficult_replay=True,
    )
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=reward, args=args, train_dataset=prompt_dataset(list(AUTHORS_PLAN))
    )
    recorder = BatchRecorder(trainer)
    trainer.train()
    logs = bapo_logs(trainer)
    # t = 2: X1 = e, f, g leaves room for one group. Re-evaluated a (0 -> 1/4) and b (1/4 -> 2/4) beat their entry
    # accuracy, i (0 -> 4/4) is solved: not admitted, yet kept. The cap keeps the first admitted, a.
    assert [log["bapo/x2"] for log in logs] == [0, 1, 0, 3]
    assert set(recorder.per_step[2]) == {"e=", "f=", "g=", "a="}
    assert [log["bapo/difficult_buffer"] for log in logs] == [3, 3, 4, 4]
    # t = 4: X1 is empty; a (2/4), b (2/4, above its 1/4) and j (0 -> 1/4) join; i (4/4) does not.
    assert set(recorder.per_step[4]) == {"a=", "b=", "j="}
    assert logs[3]["bapo/reevaluated"] == 4


def test_random_reevaluation_draws_from_the_whole_buffer(tiny_model_path, tmp_path):
    """Two prompts of B_bad re-evaluated per step, drawn at random: not always the two oldest."""
    plan = {f"{t}{name}=": [0] for t in range(6) for name in "abcd"}
    reward = ScriptedReward(plan)
    args = make_config(
        tmp_path,
        max_steps=6,
        rollout_delay=1,
        reevaluation_interval=1,
        max_reevaluation_prompts=2,
        difficult_buffer_size=8,
        reevaluation_order="random",
    )
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=reward, args=args, train_dataset=prompt_dataset(list(plan))
    )
    trainer.train()
    reevaluations = [call for call in reward.calls if all(n > 0 for n in call["scored"].values())]
    assert len(reevaluations) == 6 and all(len(call["scored"]) == 2 for call in reevaluations)
    # B_bad holds the last 8 prompts seen (all stay at 0/4), oldest first.
    held = [list(plan)[: 4 * t][-8:] for t in range(1, 7)]
    assert all(set(call["scored"]) <= set(prompts) for call, prompts in zip(reevaluations, held))
    assert any(set(call["scored"]) != set(prompts[:2]) for call, prompts in zip(reevaluations, held))
