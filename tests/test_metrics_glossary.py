"""docs/metrics.md lists every metric trl-bapo logs: one run through `trainer.train()` with every option that adds
metrics (a stale rollout policy, X2 and X3, the decoupled correction, dynamic sampling, adaptive clipping on a clipped
loss) logs exactly the `bapo/` metrics the glossary names."""

import re
from pathlib import Path

from conftest import ScriptedReward, make_config, prompt_dataset

from trl_bapo import BAPOTrainer

GLOSSARY = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
PLAN = {
    f"{t}{name}=": ks for t in range(12) for name, ks in zip("abcdefgh", [[2], [1], [0, 2], [3], [4], [0], [2], [1]])
}


def glossary_metrics() -> set[str]:
    """The metrics named in the first column of the glossary's tables."""
    names = set()
    for line in GLOSSARY.read_text().splitlines():
        if line.startswith("| `bapo/"):
            names |= set(re.findall(r"`(bapo/[^`]+)`", line.split("|")[1]))
    return names


def test_every_logged_metric_is_in_the_glossary(tiny_model_path, tmp_path):
    args = make_config(
        tmp_path,
        max_steps=8,
        rollout_delay=2,
        reevaluation_interval=2,
        high_quality_lower_range=[0.25, 0.25],
        high_quality_upper_range=[0.5, 0.5],
        off_policy_correction="decoupled",
        dynamic_sampling=True,
        dynamic_sampling_max_rounds=1,  # logs its rounds, and leaves the batch room for X3
        loss_type="bnpo",
        adaptive_clipping=True,
    )
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=ScriptedReward(PLAN), args=args, train_dataset=prompt_dataset(list(PLAN))
    )
    trainer.train()
    logged = {key for entry in trainer.state.log_history for key in entry if key.startswith("bapo/")}
    listed = glossary_metrics()
    assert len(listed) > 30, "the glossary's tables were not read"
    assert logged - listed == set(), f"logged but missing from docs/metrics.md: {sorted(logged - listed)}"
    assert listed - logged == set(), f"in docs/metrics.md but never logged: {sorted(listed - logged)}"
