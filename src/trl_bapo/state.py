"""`BAPOState`: what Algorithm 1 carries from one rollout step to the next, in one object.

The trainer holds one; the modules that read or change Algorithm 1's state (checkpoints, buffer snapshots) take it,
not the trainer. Its fields are the state's one list: `state_dict` and `load_state_dict` walk them, writing the keys
checkpoints have always had, so checkpoints written before this object existed still load.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from accelerate.utils import send_to_device

from trl_bapo.batch import select_rows
from trl_bapo.buffers import BAPOStatus, BufferedGroup, PaperBuffers, SharedBuffer, prompt_key
from trl_bapo.records import FreshRollout
from trl_bapo.rollout import RolloutSnapshot
from trl_bapo.selection import adaptive_threshold, group_rows

# Fields that come from the config, not from training: not saved, rebuilt by `from_config`.
SETTING = {"saved": False}


@dataclass
class BAPOState:
    """Algorithm 1's lasting state: the rollout step t, alpha (the rollout snapshot), B_bad and B_high, the sums
    behind r_tot (eq. 8), BAPO's own random generator, the completions generated so far, and dynamic sampling's
    pass over the train dataset."""

    batch_groups: int = field(metadata=SETTING)  # B, prompts per rollout batch
    c2_range: tuple[float, float] = field(metadata=SETTING)
    c3_range: tuple[float, float] = field(metadata=SETTING)
    snapshot: RolloutSnapshot
    buffers: PaperBuffers | SharedBuffer
    # Own generator: BAPO's random choices must not shift the global RNG that generation draws from.
    generator: torch.Generator
    rollout_step: int = 0  # t
    reward_sum: float = 0.0  # over every fresh completion so far
    reward_count: int = 0
    rollouts: int = 0  # completions generated so far, re-evaluation included
    prompt_order: list[int] = field(default_factory=list)  # dynamic sampling's pass over the train dataset

    @classmethod
    def from_config(cls, args, batch_groups: int) -> BAPOState:
        """A fresh state for `args` (a `BAPOConfig`) and B prompts per rollout batch."""
        capacity = args.difficult_buffer_size or batch_groups
        c1 = args.difficult_threshold
        buffers = (
            SharedBuffer(c1, capacity, args.high_quality_buffer_size)
            if args.shared_buffer
            else PaperBuffers(c1, capacity, args.high_quality_buffer_steps, args.high_quality_buffer_size)
        )
        return cls(
            batch_groups=batch_groups,
            c2_range=tuple(args.high_quality_lower_range),
            c3_range=tuple(args.high_quality_upper_range),
            snapshot=RolloutSnapshot(args.rollout_delay, args.rollout_refresh_phase),
            buffers=buffers,
            generator=torch.Generator().manual_seed(args.seed),
        )

    @property
    def c1(self) -> float:
        """c1 of line 8, held by the buffers, which apply it (entry, re-evaluation, the shared store's eviction)."""
        return self.buffers.c1

    @property
    def r_tot(self) -> float:
        """Global average training reward over every fresh completion so far (eq. 8)."""
        return self.reward_sum / self.reward_count if self.reward_count else 0.0

    def thresholds(self) -> tuple[float, float, float]:
        """c1, and c2, c3 of eq. 8 at the current r_tot."""
        return self.c1, adaptive_threshold(self.r_tot, self.c2_range), adaptive_threshold(self.r_tot, self.c3_range)

    def next_rollout_step(self) -> int:
        """Starts rollout step t + 1 and returns it."""
        self.rollout_step += 1
        return self.rollout_step

    def count_rollouts(self, completions: int) -> None:
        """Completions generated, fresh or re-evaluated."""
        self.rollouts += completions

    def next_prompts(self, dataset, group_size: int) -> list[dict[str, Any]]:
        """Dynamic sampling's next B prompts, each repeated G times as TRL's sampler does: a shuffled pass over the
        dataset, drawn from BAPO's own generator, begun again when spent."""
        rows = []
        for _ in range(self.batch_groups):
            if not self.prompt_order:
                self.prompt_order = torch.randperm(len(dataset), generator=self.generator).tolist()
            example = dataset[self.prompt_order.pop()]
            rows += [dict(example) for _ in range(group_size)]
        return rows

    def store(self, fresh: FreshRollout, t: int, group_size: int, difficult: bool, high_quality: bool) -> None:
        """Lines 8 and 9: offers rollout step t's fresh groups to the buffers, which take those their rules admit;
        the rows of the groups they may replay go along, on the CPU."""

        def group(g: int) -> BufferedGroup:
            example = fresh.examples[g * group_size]
            rows = select_rows(fresh.rows, group_rows(torch.tensor([g]), group_size)) if fresh.kept[g] else None
            return BufferedGroup(
                key=prompt_key(example),
                example=example,
                accuracy=float(fresh.accuracy[g]),
                step=t,
                policy_step=t - fresh.lag,
                rows=None if rows is None else send_to_device(rows, "cpu"),
            )

        self.buffers.add(fresh.accuracy.tolist(), group, fresh.c2, fresh.c3, difficult, high_quality)

    def record_rewards(self, correct: torch.Tensor) -> None:
        """Adds a fresh rollout's correctness (NaN: unscorable, left out) to r_tot's sums."""
        self.reward_sum += float(torch.nansum(correct))
        self.reward_count += int((~torch.isnan(correct)).sum())

    def status(self) -> BAPOStatus:
        _, c2, c3 = self.thresholds()
        return BAPOStatus.of(
            self.buffers,
            rollout_step=self.rollout_step,
            rollout_policy_step=self.snapshot.step,
            c1=self.c1,
            c2=c2,
            c3=c3,
            r_tot=self.r_tot,
            rollouts=self.rollouts,
        )

    def settings(self) -> dict[str, Any]:
        """The configured sizes and thresholds a checkpoint records, to say on resume which changed."""
        return {
            "rollout_delay": self.snapshot.delay,
            **self.buffers.settings(),
            "difficult_threshold (c1)": self.c1,
            "high_quality_lower_range (c2)": list(self.c2_range),
            "high_quality_upper_range (c3)": list(self.c3_range),
        }

    def state_dict(self) -> dict[str, Any]:
        """The saved fields, under the keys checkpoints use: the buffers' own ('difficult' and 'high_quality', or
        'shared'), the snapshot's and the generator's state, and every counter by name."""
        state = {}
        for f in fields(self):
            if f.metadata.get("saved", True):
                value = getattr(self, f.name)
                if isinstance(value, (PaperBuffers, SharedBuffer)):
                    state.update(value.state_dict())
                elif isinstance(value, RolloutSnapshot):
                    state[f.name] = value.state_dict()
                elif isinstance(value, torch.Generator):
                    state[f.name] = value.get_state()
                else:
                    state[f.name] = value
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            if f.metadata.get("saved", True):
                value = getattr(self, f.name)
                if isinstance(value, (PaperBuffers, SharedBuffer)):
                    value.load_state_dict(state)
                elif isinstance(value, RolloutSnapshot):
                    value.load_state_dict(state[f.name])
                elif isinstance(value, torch.Generator):
                    value.set_state(state[f.name])
                else:
                    setattr(self, f.name, state[f.name])
