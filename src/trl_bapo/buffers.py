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


@dataclass
class DifficultEntry:
    """A prompt held in B_bad: its dataset row, the accuracy it entered with, the rollout step it entered at, and how
    often it was re-evaluated since."""

    key: str
    example: dict[str, Any]
    accuracy: float
    entered: int
    reevaluated: int = 0


class DifficultBuffer:
    """B_bad: prompts whose group accuracy was <= c1, oldest first, at most `capacity` of them.

    Holds the dataset rows themselves (prompt and reward-function columns), which is what re-evaluation
    needs to generate and score fresh completions for them with the current policy.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, DifficultEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, examples: list[dict[str, Any]], accuracies: list[float], step: int = 0) -> None:
        """Appends prompts that entered at rollout `step`; a prompt already held moves to the back and starts
        over; the oldest leave beyond capacity."""
        for example, accuracy in zip(examples, accuracies, strict=True):
            key = prompt_key(example)
            self._entries.pop(key, None)
            self._entries[key] = DifficultEntry(key, example, accuracy, step)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def oldest(self, count: int) -> list[dict[str, Any]]:
        return [entry.example for _, entry in zip(range(count), self._entries.values())]

    def sample(self, count: int, generator: torch.Generator) -> list[dict[str, Any]]:
        """`count` prompts drawn at random (all of them when there are fewer), in the buffer's order."""
        examples = [entry.example for entry in self._entries.values()]
        chosen = torch.randperm(len(examples), generator=generator)[:count]
        return [examples[i] for i in sorted(chosen.tolist())]

    def accuracy(self, example: dict[str, Any]) -> float:
        """The accuracy `example` had when it entered the buffer."""
        return self._entries[prompt_key(example)].accuracy

    def count_reevaluated(self, examples: list[dict[str, Any]]) -> None:
        for example in examples:
            self._entries[prompt_key(example)].reevaluated += 1

    def remove(self, examples: list[dict[str, Any]]) -> None:
        for example in examples:
            self._entries.pop(prompt_key(example), None)

    def entries(self) -> list[DifficultEntry]:
        return list(self._entries.values())

    def prompts(self) -> list[Any]:
        return [entry.example["prompt"] for entry in self._entries.values()]

    def state_dict(self) -> dict[str, Any]:
        entries = self._entries.values()
        return {
            "examples": [entry.example for entry in entries],
            "accuracies": [entry.accuracy for entry in entries],
            "entered": [entry.entered for entry in entries],
            "reevaluated": [entry.reevaluated for entry in entries],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the prompts; beyond this buffer's capacity the oldest leave, as they would on `add`. A state
        written before accuracies were kept (trl-bapo 0.1.0) gives each prompt an accuracy of 0, and one written
        before entry steps were kept, step 0."""
        examples, count = state["examples"], len(state["examples"])
        self._entries = OrderedDict()
        for example, accuracy, entered, reevaluated in zip(
            examples,
            state.get("accuracies", [0.0] * count),
            state.get("entered", [0] * count),
            state.get("reevaluated", [0] * count),
            strict=True,
        ):
            self.add([example], [accuracy], entered)
            self._entries[prompt_key(example)].reevaluated = reevaluated


@dataclass
class ReplayGroup:
    """One stored group of eq. 4: the G rows of a TRL batch (prompt, completions, advantages and the
    behavior policy's per-token log-probs), its accuracy, the rollout step that generated it and the step its
    generating policy alpha was taken at, its prompt and prompt key, and how often X3 replayed it."""

    step: int
    accuracy: float
    rows: dict[str, Any]
    prompt: Any
    policy_step: int = 0
    key: str = ""
    replayed: int = 0


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
        drawn = [candidates[int(eligible[i])] for i in sorted(order.tolist())]
        for group in drawn:
            group.replayed += 1
        return drawn

    def groups(self) -> list[ReplayGroup]:
        return list(self._groups)

    def state_dict(self) -> dict[str, Any]:
        return {"groups": [vars(group) for group in self._groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A state written before policy steps were kept takes each group's own step as its policy's."""
        self._groups = [ReplayGroup(**{"policy_step": group["step"], **group}) for group in state["groups"]]


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
