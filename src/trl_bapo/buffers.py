"""The two FIFO buffers of Algorithm 1, B_bad (difficult prompts) and B_high (recent high-quality groups), and the
read-only view of them that `BAPOTrainer.bapo_status` gives users."""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from datasets.fingerprint import Hasher

from trl_bapo.selection import high_quality_mask


def prompt_key(example: dict[str, Any]) -> str:
    """u_i of eq. 4: identifies a prompt by its whole dataset row (text, images, and the columns the rewards read),
    so a prompt met again is not stored twice, while two problems that share their text ("Find x." over two
    diagrams) stay two. The hash is `datasets`' own fingerprint, the same for equal content in any process."""
    return Hasher.hash(example)


class DifficultBuffer:
    """B_bad: prompts whose group accuracy was <= c1, oldest first, at most `capacity` of them, each with the
    accuracy it entered with.

    Holds the dataset rows themselves (prompt and reward-function columns), which is what re-evaluation
    needs to generate and score fresh completions for them with the current policy.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._accuracy: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, examples: list[dict[str, Any]], accuracies: list[float]) -> None:
        """Appends prompts; a prompt already held moves to the back; the oldest leave beyond capacity."""
        for example, accuracy in zip(examples, accuracies, strict=True):
            key = prompt_key(example)
            self._entries.pop(key, None)
            self._entries[key] = example
            self._accuracy[key] = accuracy
        while len(self._entries) > self.capacity:
            self._accuracy.pop(self._entries.popitem(last=False)[0])

    def oldest(self, count: int) -> list[dict[str, Any]]:
        return [example for _, example in zip(range(count), self._entries.values())]

    def sample(self, count: int, generator: torch.Generator) -> list[dict[str, Any]]:
        """`count` prompts drawn at random (all of them when there are fewer), in the buffer's order."""
        examples = list(self._entries.values())
        chosen = torch.randperm(len(examples), generator=generator)[:count]
        return [examples[i] for i in sorted(chosen.tolist())]

    def accuracy(self, example: dict[str, Any]) -> float:
        """The accuracy `example` had when it entered the buffer."""
        return self._accuracy[prompt_key(example)]

    def remove(self, examples: list[dict[str, Any]]) -> None:
        for example in examples:
            key = prompt_key(example)
            self._entries.pop(key, None)
            self._accuracy.pop(key, None)

    def prompts(self) -> list[Any]:
        return [example["prompt"] for example in self._entries.values()]

    def state_dict(self) -> dict[str, Any]:
        return {"examples": list(self._entries.values()), "accuracies": [self._accuracy[k] for k in self._entries]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the prompts; beyond this buffer's capacity the oldest leave, as they would on `add`. A state
        written before accuracies were kept (trl-bapo 0.1.0) gives each prompt an accuracy of 0."""
        self._entries, self._accuracy = OrderedDict(), {}
        self.add(state["examples"], state.get("accuracies", [0.0] * len(state["examples"])))


@dataclass
class ReplayGroup:
    """One stored group of eq. 4: the G rows of a TRL batch (prompt, completions, advantages and the
    behavior policy's per-token log-probs), its accuracy and the rollout step that generated it."""

    step: int
    accuracy: float
    rows: dict[str, Any]
    prompt: Any


class HighQualityBuffer:
    """B_high: groups with c2 <= mu <= c3 from the `window` most recent rollout steps.

    A group generated at step s may be drawn into X3 at steps s+1 .. s+window; drawing does not remove it.
    """

    def __init__(self, window: int):
        self.window = window
        self._groups: list[ReplayGroup] = []

    def __len__(self) -> int:
        return len(self._groups)

    def add(self, groups: list[ReplayGroup]) -> None:
        self._groups.extend(groups)

    def expire(self, step: int) -> None:
        """Drops groups older than the window as seen from rollout step `step`."""
        self._groups = [group for group in self._groups if group.step >= step - self.window]

    def sample(self, step: int, c2: float, c3: float, count: int, generator: torch.Generator) -> list[ReplayGroup]:
        """X3 (eq. 7 and line 16): `count` random groups from earlier steps whose accuracy is in [c2, c3]."""
        candidates = [group for group in self._groups if group.step < step]
        if not candidates or count <= 0:
            return []
        accuracy = torch.tensor([group.accuracy for group in candidates])
        eligible = high_quality_mask(accuracy, c2, c3).nonzero().flatten()
        order = torch.randperm(len(eligible), generator=generator)[:count]
        return [candidates[int(eligible[i])] for i in sorted(order.tolist())]

    def groups(self) -> list[ReplayGroup]:
        return list(self._groups)

    def state_dict(self) -> dict[str, Any]:
        return {"groups": [vars(group) for group in self._groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._groups = [ReplayGroup(**group) for group in state["groups"]]


class StoredGroup(NamedTuple):
    """A group held in B_high, as `BAPOStatus` shows it."""

    step: int
    accuracy: float
    prompt: Any


@dataclass(frozen=True)
class BAPOStatus:
    """What BAPO holds after rollout step t: the buffers' contents, the thresholds and the rollouts spent. A copy:
    changing it changes nothing in the trainer."""

    rollout_step: int  # t of Algorithm 1
    rollout_policy_step: int | None  # the step alpha was taken at; None before the first rollout
    difficult_prompts: tuple[Any, ...]  # B_bad, oldest first
    high_quality_groups: tuple[StoredGroup, ...]  # B_high
    c1: float
    c2: float  # eq. 8, from the running reward r_tot
    c3: float
    r_tot: float
    rollouts: int  # completions generated so far, re-evaluation included

    @classmethod
    def of(cls, difficult: DifficultBuffer, high_quality: HighQualityBuffer, **values: Any) -> BAPOStatus:
        return cls(
            difficult_prompts=tuple(copy.deepcopy(difficult.prompts())),
            high_quality_groups=tuple(
                StoredGroup(group.step, group.accuracy, copy.deepcopy(group.prompt)) for group in high_quality.groups()
            ),
            **values,
        )
