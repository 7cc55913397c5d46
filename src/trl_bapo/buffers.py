"""Algorithm 1's buffers, B_bad (difficult prompts) and B_high (recent high-quality groups), in two layouts, and the
read-only view of them that `BAPOTrainer.bapo_status` gives users.

- `PaperBuffers` (the default): two FIFO buffers, as the paper describes them. B_bad holds prompts, at most
  `capacity`, oldest first; B_high holds the groups of the last `window` rollout steps (optionally at most `cap`).
- `SharedBuffer` (`shared_buffer=True`): one store, as the authors' code keeps it (github waunx/BAPO_ICLR,
  verl/trainer/ppo/ray_trainer.py, `OffPolicyGroupBuffer._check_and_evict`): every stored rollout group is an entry;
  nothing leaves until the store is full, and then entries are classed by their latest accuracy.

Both hold `BufferedGroup`s and answer the same four calls of Algorithm 1: `add` (lines 8 and 9), `draw_reevaluation`
and `after_reevaluation` (lines 12-15), `draw_replay` (line 16). They own c1 and the rules that read it: which groups
enter B_bad (line 8), which re-evaluated prompts join X2 (eq. 6) and which leave B_bad; the trainer only asks.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from datasets.fingerprint import Hasher

from trl_bapo.selection import difficult_mask, high_quality_mask, reevaluation_admitted

# The authors' store keeps the last 32 re-evaluation outcomes of an entry (their `max_scores_per_uid`): an entry's
# latest accuracy is their mean, up to four re-evaluations of 8 completions pooled.
SCORES_KEPT = 32


def prompt_key(example: dict[str, Any]) -> str:
    """u_i of eq. 4: identifies a prompt by its whole dataset row (text, images, and the columns the rewards read),
    so a prompt met again is not stored twice, while two problems that share their text ("Find x." over two
    diagrams) stay two. The hash is `datasets`' own fingerprint, the same for equal content in any process."""
    return Hasher.hash(example)


@dataclass
class BufferedGroup:
    """A rollout group held by a buffer: its prompt's dataset row (`example`) and prompt key, the accuracy mu it was
    stored with, the rollout step that generated it and the step its generating policy alpha was taken at, its G
    rows of a TRL batch (completions, advantages, behavior log-probs; kept where X3 may replay it), how often it was
    re-evaluated and replayed, and its re-evaluations' outcomes (the shared store reads its latest accuracy there)."""

    key: str
    example: dict[str, Any]
    accuracy: float
    step: int
    policy_step: int = 0
    rows: dict[str, Any] | None = None
    reevaluated: int = 0
    replayed: int = 0
    scores: list[float] = field(default_factory=list)

    @property
    def prompt(self) -> Any:
        return self.example.get("prompt")  # an environment_factory makes the prompt column optional


def draw(groups: list[BufferedGroup], count: int, generator: torch.Generator) -> list[BufferedGroup]:
    """`count` groups drawn at random (all of them when there are fewer), in the order they are held."""
    chosen = torch.randperm(len(groups), generator=generator)[: max(count, 0)]
    return [groups[i] for i in sorted(chosen.tolist())]


def in_band(accuracy: list[float], c2: float, c3: float) -> list[bool]:
    """Selection's c2 <= mu <= c3 (lines 9 and 16), on a list."""
    return high_quality_mask(torch.tensor(accuracy, dtype=torch.float64), c2, c3).tolist() if accuracy else []


def is_difficult(accuracy: list[float], c1: float) -> list[bool]:
    """Selection's mu <= c1 (line 8), on a list; an unscorable (NaN) accuracy is not difficult."""
    return difficult_mask(torch.tensor(accuracy, dtype=torch.float64), c1).tolist() if accuracy else []


def counted_reevaluation(
    groups: list[BufferedGroup], accuracy: list[float], c1: float, admission: str
) -> tuple[list[bool], list[BufferedGroup]]:
    """Eq. 6 for re-evaluated prompts (their new `accuracy`): which join X2 under the `difficult_admission` rule, and
    which are no longer difficult (mu > c1). Counts the re-evaluation on each group."""
    for group in groups:
        group.reevaluated += 1
    entered_with = torch.tensor([group.accuracy for group in groups])
    admitted = reevaluation_admitted(torch.tensor(accuracy), entered_with, c1, admission).tolist()
    return admitted, [group for group, hard in zip(groups, is_difficult(accuracy, c1)) if not hard]


class DifficultBuffer:
    """B_bad: prompts whose group accuracy was <= c1, oldest first, at most `capacity` of them; a prompt met again
    moves to the back and starts over. Holds the dataset rows, which is what re-evaluation needs to generate and
    score fresh completions for them with the current policy."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, BufferedGroup] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, groups: list[BufferedGroup]) -> None:
        for group in groups:
            self._entries.pop(group.key, None)
            self._entries[group.key] = replace(group, rows=None)  # re-evaluation regenerates; no rows to keep
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def remove(self, groups: list[BufferedGroup]) -> None:
        for group in groups:
            self._entries.pop(group.key, None)

    def entries(self) -> list[BufferedGroup]:
        return list(self._entries.values())

    def state_dict(self) -> dict[str, Any]:
        entries = self._entries.values()
        return {
            "examples": [entry.example for entry in entries],
            "accuracies": [entry.accuracy for entry in entries],
            "entered": [entry.step for entry in entries],
            "reevaluated": [entry.reevaluated for entry in entries],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the prompts; beyond this buffer's capacity the oldest leave, as they would on `add`. A state
        written before accuracies were kept (trl-bapo 0.1.0) gives each prompt an accuracy of 0, and one written
        before entry steps were kept, step 0."""
        examples, count = state["examples"], len(state["examples"])
        self._entries = OrderedDict()
        self.add(
            [
                BufferedGroup(prompt_key(example), example, accuracy, entered, reevaluated=reevaluated)
                for example, accuracy, entered, reevaluated in zip(
                    examples,
                    state.get("accuracies", [0.0] * count),
                    state.get("entered", [0] * count),
                    state.get("reevaluated", [0] * count),
                    strict=True,
                )
            ]
        )


class HighQualityBuffer:
    """B_high: groups with c2 <= mu <= c3 from the `window` most recent rollout steps, at most `cap` of them (the
    oldest leave first; None: no cap). A group generated at step s may be drawn into X3 at steps s+1 .. s+window;
    drawing does not remove it."""

    def __init__(self, window: int, cap: int | None = None):
        self.window, self.cap = window, cap
        self._groups: list[BufferedGroup] = []

    def __len__(self) -> int:
        return len(self._groups)

    def add(self, groups: list[BufferedGroup]) -> None:
        self._groups.extend(groups)
        if self.cap is not None:
            self._groups = self._groups[-self.cap :]

    def expire(self, step: int) -> None:
        """Drops groups older than the window as seen from rollout step `step`."""
        self._groups = [group for group in self._groups if group.step >= step - self.window]

    def entries(self) -> list[BufferedGroup]:
        return list(self._groups)

    def state_dict(self) -> dict[str, Any]:
        return {
            "groups": [
                {
                    "step": group.step,
                    "accuracy": group.accuracy,
                    "rows": group.rows,
                    "prompt": group.prompt,
                    "policy_step": group.policy_step,
                    "key": group.key,
                    "replayed": group.replayed,
                }
                for group in self._groups
            ]
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A state written before policy steps were kept takes each group's own step as its policy's."""
        self._groups = [
            BufferedGroup(
                key=group.get("key", ""),
                example={"prompt": group["prompt"]},
                accuracy=group["accuracy"],
                step=group["step"],
                policy_step=group.get("policy_step", group["step"]),
                rows=group["rows"],
                replayed=group.get("replayed", 0),
            )
            for group in state["groups"]
        ]


class PaperBuffers:
    """The paper's layout: B_bad, a FIFO of prompts, and B_high, a window of recent groups."""

    def __init__(self, c1: float, capacity: int, window: int, high_quality_size: int | None = None):
        self.c1 = c1
        self.difficult = DifficultBuffer(capacity)
        self.high_quality = HighQualityBuffer(window, high_quality_size)

    def keeps_rows(
        self, accuracy: torch.Tensor, c2: float, c3: float, difficult: bool, high_quality: bool
    ) -> torch.Tensor:
        """Groups whose rows `add` would keep for replay: B_high's."""
        return high_quality_mask(accuracy, c2, c3) & high_quality

    def add(
        self,
        accuracy: list[float],
        group: Callable[[int], BufferedGroup],
        c2: float,
        c3: float,
        difficult: bool,
        high_quality: bool,
    ) -> None:
        """Lines 8 and 9: of a rollout's groups (their `accuracy`; `group(g)` builds group g), prompts at mu <= c1
        enter B_bad (when `difficult`), groups at c2 <= mu <= c3 B_high (when `high_quality`). Only the groups taken
        are built."""
        hard, band = is_difficult(accuracy, self.c1), in_band(accuracy, c2, c3)
        if difficult:
            self.difficult.add([group(g) for g, h in enumerate(hard) if h])
        if high_quality:
            self.high_quality.add([group(g) for g, b in enumerate(band) if b])

    def draw_reevaluation(self, count: int, order: str, generator: torch.Generator) -> list[BufferedGroup]:
        """B_bad's prompts to re-evaluate: the `count` oldest, or with order 'random' a random draw."""
        entries = self.difficult.entries()
        return draw(entries, count, generator) if order == "random" else entries[:count]

    def after_reevaluation(
        self,
        groups: list[BufferedGroup],
        accuracy: list[float],
        outcomes: list[list[float]],
        keep: bool,
        admission: str,
    ) -> list[bool]:
        """Which re-evaluated prompts join X2 (eq. 6, by their new `accuracy`); unless `keep`, those re-evaluated above
        c1 leave B_bad."""
        admitted, solved = counted_reevaluation(groups, accuracy, self.c1, admission)
        if not keep:
            self.difficult.remove(solved)
        return admitted

    def draw_replay(self, step: int, c2: float, c3: float, count: int, generator) -> list[BufferedGroup]:
        """X3 (eq. 7 and line 16): `count` random groups of earlier steps in B_high's window with c2 <= mu <= c3."""
        self.high_quality.expire(step)
        candidates = [group for group in self.high_quality.entries() if group.step < step]
        if not candidates or count <= 0:  # no draw from the generator, so runs repeat those of trl-bapo 0.2.0
            return []
        eligible = [
            group for group, band in zip(candidates, in_band([g.accuracy for g in candidates], c2, c3)) if band
        ]
        drawn = draw(eligible, count, generator)
        for group in drawn:
            group.replayed += 1
        return drawn

    def difficult_entries(self) -> list[BufferedGroup]:
        return self.difficult.entries()

    def high_quality_entries(self) -> list[BufferedGroup]:
        return self.high_quality.entries()

    def settings(self) -> dict[str, int | None]:
        return {
            "difficult_buffer_size": self.difficult.capacity,
            "high_quality_buffer_steps": self.high_quality.window,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"difficult": self.difficult.state_dict(), "high_quality": self.high_quality.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.difficult.load_state_dict(state["difficult"])
        self.high_quality.load_state_dict(state["high_quality"])


class SharedBuffer:
    """The authors' layout (github waunx/BAPO_ICLR, verl/trainer/ppo/ray_trainer.py, `OffPolicyManager` and
    `OffPolicyGroupBuffer`): one store of at most `capacity` entries (their `max_total_uids`), each a stored rollout
    group (a prompt met twice is two entries). Difficult groups (mu <= c1) and groups in the band [c2, c3] enter it at
    the end of their rollout step; nothing leaves until it is full.

    When full, each entry is classed by its latest accuracy: the mean of its re-evaluations' outcomes, else the
    accuracy it entered with. High-quality entries (latest in [c2, c3]) beyond `high_quality_size` leave, oldest
    first; difficult ones (latest <= c1, not in the band) beyond the rest of the capacity leave, oldest first; if
    still over, entries in neither class (re-evaluated above the band) leave first, then difficult ones, then
    high-quality ones, oldest first. No entry leaves by age alone: B_high's window does not apply here.

    Re-evaluation draws from the entries that entered at mu <= c1, whatever they scored since; X3 from the entries
    whose latest accuracy is in [c2, c3], which includes difficult prompts re-evaluated into the band: X3 then
    replays their stored rollout."""

    def __init__(self, c1: float, capacity: int, high_quality_size: int):
        self.c1, self.capacity, self.high_quality_size = c1, capacity, high_quality_size
        self._entries: list[BufferedGroup] = []
        self._band = (c1, c1)  # [c2, c3] of the last rollout step, for the views below

    def __len__(self) -> int:
        return len(self._entries)

    def keeps_rows(
        self, accuracy: torch.Tensor, c2: float, c3: float, difficult: bool, high_quality: bool
    ) -> torch.Tensor:
        """Groups whose rows `add` would keep: every entry's, since any of them may enter the band and be replayed."""
        return (difficult_mask(accuracy, self.c1) & difficult) | (high_quality_mask(accuracy, c2, c3) & high_quality)

    def entries(self) -> list[BufferedGroup]:
        return list(self._entries)

    def latest(self, group: BufferedGroup) -> float:
        """The mean of its re-evaluations' scorable outcomes, else the accuracy it entered with."""
        return float(torch.tensor(group.scores, dtype=torch.float64).nanmean()) if group.scores else group.accuracy

    def add(
        self,
        accuracy: list[float],
        group: Callable[[int], BufferedGroup],
        c2: float,
        c3: float,
        difficult: bool,
        high_quality: bool,
    ) -> None:
        """Stores, in rollout order, the groups at mu <= c1 (when `difficult`) and in [c2, c3] (when
        `high_quality`), each followed by the eviction check, as the authors' `collect_data` adds them."""
        self._band = (c2, c3)
        for g, (hard, band) in enumerate(zip(is_difficult(accuracy, self.c1), in_band(accuracy, c2, c3))):
            if (difficult and hard) or (high_quality and band):
                self._entries.append(group(g))
                self._evict(c2, c3)

    def _evict(self, c2: float, c3: float) -> None:
        if len(self._entries) <= self.capacity:
            return
        latest = [self.latest(group) for group in self._entries]
        band, hard = in_band(latest, c2, c3), is_difficult(latest, self.c1)
        high = [g for g, b in zip(self._entries, band) if b]
        difficult = [g for g, b, h in zip(self._entries, band, hard) if not b and h]
        other = [g for g, b, h in zip(self._entries, band, hard) if not b and not h]
        leaving: list[BufferedGroup] = []
        if len(high) > self.high_quality_size:
            # The authors evict the stale ones first (stored more than `max_high_quality_staleness_steps` ago), then
            # the oldest; entries are kept in the order they were stored, so the stale ones are the oldest anyway.
            leaving += high[: len(high) - self.high_quality_size]
            high = high[len(high) - self.high_quality_size :]
        if len(difficult) > self.capacity - self.high_quality_size:
            over = len(difficult) - (self.capacity - self.high_quality_size)
            leaving += difficult[:over]
            difficult = difficult[over:]
        over = len(high) + len(difficult) + len(other) - self.capacity
        for kind in (other, difficult, high):
            leaving += kind[: max(over, 0)]
            over -= len(kind[: max(over, 0)])
        self._entries = [group for group in self._entries if not any(group is g for g in leaving)]

    def draw_reevaluation(self, count: int, order: str, generator: torch.Generator) -> list[BufferedGroup]:
        """Entries that entered at mu <= c1: the `count` oldest, or with order 'random' a random draw."""
        candidates = self.difficult_entries()
        return draw(candidates, count, generator) if order == "random" else candidates[:count]

    def after_reevaluation(
        self,
        groups: list[BufferedGroup],
        accuracy: list[float],
        outcomes: list[list[float]],
        keep: bool,
        admission: str,
    ) -> list[bool]:
        """Which re-evaluated entries join X2 (eq. 6, by their new `accuracy`); each keeps the outcomes (its last
        `SCORES_KEPT`); unless `keep`, entries re-evaluated above c1 leave."""
        admitted, solved = counted_reevaluation(groups, accuracy, self.c1, admission)
        for group, outcome in zip(groups, outcomes):
            group.scores = (group.scores + outcome)[-SCORES_KEPT:]
        if not keep:
            self._entries = [group for group in self._entries if not any(group is g for g in solved)]
        return admitted

    def draw_replay(self, step: int, c2: float, c3: float, count: int, generator) -> list[BufferedGroup]:
        """X3: `count` random entries whose latest accuracy is in [c2, c3] (all of them entered at earlier steps)."""
        self._band = (c2, c3)
        drawn = draw(self.high_quality_entries(), count, generator)
        for group in drawn:
            group.replayed += 1
        return drawn

    def difficult_entries(self) -> list[BufferedGroup]:
        """B_bad as re-evaluation sees it: entries that entered at mu <= c1."""
        hard = is_difficult([group.accuracy for group in self._entries], self.c1)
        return [group for group, h in zip(self._entries, hard) if h]

    def high_quality_entries(self) -> list[BufferedGroup]:
        """B_high as X3 sees it: entries whose latest accuracy is in the band of the last rollout step."""
        latest = [self.latest(group) for group in self._entries]
        return [group for group, band in zip(self._entries, in_band(latest, *self._band)) if band]

    def settings(self) -> dict[str, int | None]:
        return {"difficult_buffer_size": self.capacity, "high_quality_buffer_size": self.high_quality_size}

    def state_dict(self) -> dict[str, Any]:
        return {"shared": {"band": list(self._band), "entries": [vars(group) for group in self._entries]}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._band = tuple(state["shared"]["band"])
        self._entries = [BufferedGroup(**entry) for entry in state["shared"]["entries"]]


class StoredGroup(NamedTuple):
    """A group held in B_high, as `BAPOStatus` shows it.

    Attributes:
        step: the rollout step t the group was generated at.
        accuracy: the share of its G completions that were correct.
        prompt: its dataset row.
    """

    step: int
    accuracy: float
    prompt: Any


@dataclass(frozen=True)
class BAPOStatus:
    """What BAPO holds after rollout step t: the buffers' contents, the thresholds and the rollouts spent. A copy:
    changing it changes nothing in the trainer.

    Attributes:
        rollout_step: t of Algorithm 1.
        rollout_policy_step: the step alpha was taken at; None before the first rollout.
        difficult_prompts: B_bad's dataset rows, oldest first.
        high_quality_groups: B_high's groups.
        c1: the thresholds of eq. 8, from the running reward r_tot.
        c2: as c1.
        c3: as c1.
        r_tot: the running reward of eq. 8.
        rollouts: completions generated so far, re-evaluation included.
        correctness: which reward defines a correct completion, in words (`trl_bapo.scoring.Correctness`).
    """

    rollout_step: int
    rollout_policy_step: int | None
    difficult_prompts: tuple[Any, ...]
    high_quality_groups: tuple[StoredGroup, ...]
    c1: float
    c2: float
    c3: float
    r_tot: float
    rollouts: int
    correctness: str = ""

    @classmethod
    def of(cls, buffers: PaperBuffers | SharedBuffer, **values: Any) -> BAPOStatus:
        return cls(
            difficult_prompts=tuple(copy.deepcopy([group.prompt for group in buffers.difficult_entries()])),
            high_quality_groups=tuple(
                StoredGroup(group.step, group.accuracy, copy.deepcopy(group.prompt))
                for group in buffers.high_quality_entries()
            ),
            **values,
        )
