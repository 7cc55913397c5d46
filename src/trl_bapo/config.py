"""`BAPOConfig`: GRPOConfig plus the switches and thresholds of Batch Adaptation Policy Optimization.

Symbols follow the paper (Batch Adaptation Policy Optimization, Algorithm 1 in appendix A.8, defaults from
Table 3 in appendix A.7). Thresholds whose default is `None` take Table 3's value, or `mini_test`'s, when the config
is built, so that `mini_test` can tell a threshold a user set from a default one.
"""

from __future__ import annotations

import json
import math
import textwrap
import warnings
from dataclasses import MISSING, dataclass, field, fields

from transformers.utils import logging
from trl import GRPOConfig

from trl_bapo.losses import LOSSES, REC_VARIANTS

ONLINE_FILTERS = ("range", "gaussian", "uniform", "none")
REEVALUATION_ORDERS = ("oldest", "random")
DIFFICULT_ADMISSIONS = ("paper", "improved", "improved_or_solved")
OFF_POLICY_CORRECTIONS = ("behavior", "decoupled")
X3_ANCHORS = ("start", "stored")
BATCH_AGGREGATIONS = ("spread", "mini_batch")
KL_REFERENCES = ("behavior", "ref")
# Accepted spellings that mean one of KL_REFERENCES.
KL_REFERENCE_ALIASES = {"behaviour": "behavior"}

# Table 3's thresholds, and mini_test's (section 5.2): c1, then the ranges of c2 and c3.
DEFAULT_THRESHOLDS = (1 / 8, [1 / 8, 4 / 8], [2 / 8, 5 / 8])
MINI_TEST_THRESHOLDS = (0.0, [0.5, 0.5], [0.5, 0.5])
THRESHOLD_FIELDS = ("difficult_threshold", "high_quality_lower_range", "high_quality_upper_range")
NON_FINITE_REWARDS = ("error", "none")
ROLLOUT_SAMPLING_SEEDS = ("global", "per_step")
# generation_kwargs that change the distribution sampled from (transformers' and vLLM's names).
SAMPLING_KWARGS = {
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "top_h",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "logit_bias",
    "allowed_token_ids",
}

logger = logging.get_logger(__name__)

# Fewest prompts per rollout batch (B) the online filter and the buffers can work with: below it, X1 keeps whole groups
# out of a handful, B_bad (one rollout batch of prompts by default) holds one or two, and X3 fills what X1 leaves of B.
MIN_BATCH_PROMPTS = 4

# The docstring's headings, as GRPOConfig's groups its fields, and which of BAPOConfig's fields fall under each.
HEADINGS = {
    "Batch assembly (Algorithm 1)": (
        "rollout_delay",
        "reevaluation_interval",
        "max_reevaluation_prompts",
        "difficult_buffer_size",
        "high_quality_buffer_steps",
        "online_filter",
        "online_filter_gaussian_mean",
        "online_filter_gaussian_std",
        "online_filter_uniform_keep",
        "use_difficult_replay",
        "use_high_quality_replay",
        "mini_test",
    ),
    "The authors' code (github waunx/BAPO_ICLR)": (
        "rollout_refresh_phase",
        "reevaluation_order",
        "difficult_admission",
        "keep_reevaluated_prompts",
        "cap_difficult_replay",
        "difficult_entry_after_update",
        "online_filter_fallback",
        "shared_buffer",
        "high_quality_buffer_size",
        "x3_anchor",
        "batch_aggregation",
    ),
    "Thresholds": (
        "difficult_threshold",
        "high_quality_lower_range",
        "high_quality_upper_range",
        "correctness_reward",
        "correctness_threshold",
        "non_finite_rewards",
    ),
    "Losses for stale data": (
        "off_policy_correction",
        "importance_sampling_cap",
        "kl_reference",
        "loss_type",
        "rec_variant",
        "rec_ring_epsilon_low",
        "rec_ring_epsilon_high",
        "asymre_tau",
        "opmd_tau",
        "adaptive_clipping",
        "adaptive_clip_start",
        "adaptive_clip_max",
        "adaptive_clip_step",
        "adaptive_clip_target",
        "adaptive_clip_dual",
    ),
    "Dynamic sampling (DAPO)": ("dynamic_sampling", "dynamic_sampling_max_rounds"),
    "Rollout timing (not in the paper)": ("rollout_sampling_seed", "overlap_rollout"),
    "Resume": ("resume_without_bapo_state",),
    "What BAPO did": ("track_prompts", "log_buffer_snapshots"),
}


@dataclass
class BAPOConfig(GRPOConfig):
    r"""
    Configuration for [`BAPOTrainer`]. Every field of [`~trl.GRPOConfig`] applies unchanged; the fields below
    add Batch Adaptation Policy Optimization. With `rollout_delay=1`, `online_filter="none"`,
    `use_difficult_replay=False`, `use_high_quality_replay=False` and `kl_reference="ref"` the trainer trains
    exactly as `GRPOTrainer` does.
    """

    # Batch assembly (Algorithm 1)
    rollout_delay: int = field(
        default=5,
        metadata={
            "help": "v in the paper: the rollout policy is a copy of the policy refreshed every v rollout steps "
            "(t mod v == 0). 1 means on-policy rollouts."
        },
    )
    reevaluation_interval: int = field(
        default=5,
        metadata={
            "help": "m in the paper: every m rollout steps (t mod m == 0) the difficult buffer B_bad is "
            "re-evaluated with the current policy to build X2."
        },
    )
    max_reevaluation_prompts: int = field(
        default=128,
        metadata={
            "help": "Most prompts of B_bad re-evaluated at once, chosen as `reevaluation_order` says; paper: 128."
        },
    )
    reevaluation_order: str = field(
        default="oldest",
        metadata={
            "help": "Which prompts of B_bad are re-evaluated, at most `max_reevaluation_prompts` of them: 'oldest' "
            "first (the paper's FIFO) or 'random' (the authors' code draws them at random).",
            "choices": list(REEVALUATION_ORDERS),
        },
    )
    difficult_buffer_size: int | None = field(
        default=None,
        metadata={
            "help": "|B_bad|, the FIFO capacity of the difficult-prompt buffer (with `shared_buffer`, the capacity "
            "of the store B_bad and B_high share, the authors' max_total_uids). None means the number of prompts "
            "per rollout batch, as in the paper."
        },
    )
    high_quality_buffer_steps: int = field(
        default=3,
        metadata={
            "help": "B_high keeps the groups of only this many most recent rollout steps (paper: 3). Not with "
            "`shared_buffer`, where nothing leaves by age."
        },
    )
    online_filter: str = field(
        default="range",
        metadata={
            "help": "Filter that turns fresh groups into X1 (appendix A.3): 'range' keeps the groups with non-zero "
            "reward variance on any reward scale (with 0/1 rewards, accuracy in [1/G, (G-1)/G]), 'gaussian' keeps a "
            "group with probability exp(-(acc - mean)^2 / (2 std^2)) (by its variance when there is no correctness "
            "signal), 'uniform' keeps a random share, 'none' keeps every group.",
            "choices": list(ONLINE_FILTERS),
        },
    )
    online_filter_gaussian_mean: float = field(default=0.5, metadata={"help": "Gaussian filter mean (mu in Table 3)."})
    online_filter_gaussian_std: float = field(
        default=0.2, metadata={"help": "Gaussian filter standard deviation (sigma in Table 3)."}
    )
    online_filter_uniform_keep: float = field(
        default=0.6, metadata={"help": "Share of fresh groups the uniform filter keeps (0.6 in appendix A.3)."}
    )
    use_difficult_replay: bool = field(
        default=True, metadata={"help": "Build X2 from re-evaluated difficult prompts (B_bad)."}
    )
    difficult_admission: str = field(
        default="paper",
        metadata={
            "help": "Which re-evaluated prompts join X2: 'paper' (eq. 6) those with c1 < mu < 1; 'improved' those "
            "whose new mu beats the mu they entered B_bad with, and stays below 1; 'improved_or_solved' those whose "
            "new mu beats it, all-correct groups included, as the authors' code admits them (an all-correct group "
            "has no advantage: it takes room in the batch and tokens in the loss's mean, and moves nothing).",
            "choices": list(DIFFICULT_ADMISSIONS),
        },
    )
    keep_reevaluated_prompts: bool = field(
        default=False,
        metadata={
            "help": "Re-evaluation removes nothing from B_bad, whatever the new mu (the authors' code; with "
            "`shared_buffer`, their eviction then moves solved prompts out first once the store is full). False: a "
            "prompt re-evaluated above c1 leaves B_bad, so it holds only what is still unsolved."
        },
    )
    cap_difficult_replay: bool = field(
        default=False,
        metadata={
            "help": "Cap X2 to the room X1 leaves in the batch, B - |X1| groups (the authors' code caps it in rows). "
            "False: X2 is not capped, so a re-evaluation step can train on more than B groups."
        },
    )
    use_high_quality_replay: bool = field(
        default=True, metadata={"help": "Fill the batch with X3, historical high-quality groups from B_high."}
    )
    mini_test: bool = field(
        default=False,
        metadata={
            "help": "The parameter-free variant of section 5.2: X1 drops only all-correct/all-wrong groups, "
            "X2 replays exactly the all-wrong prompts (c1 = 0), X3 reuses exactly the groups at accuracy 1/2. "
            "Leave the thresholds and `online_filter` at their defaults with it."
        },
    )
    rollout_refresh_phase: int = field(
        default=0,
        metadata={
            "help": "Which rollout steps refresh alpha: those with (t - phase) mod v == 0, and the first. 0 is "
            "Algorithm 1's t mod v; the authors' code refreshes at (t - 1) mod v (its step counter starts at 0), "
            "phase 1. Must be below rollout_delay."
        },
    )
    difficult_entry_after_update: bool = field(
        default=False,
        metadata={
            "help": "Store a rollout step's difficult prompts in B_bad at the end of the step, after X2 and X3 are "
            "drawn (the authors' code fills its buffer after the update), so they are re-evaluated from the next "
            "re-evaluation step on. False: Algorithm 1's order, line 8 before the re-evaluation of line 12, so a "
            "prompt can be re-evaluated in the step it entered."
        },
    )
    online_filter_fallback: bool = field(
        default=False,
        metadata={
            "help": "When the online filter keeps no fresh group, X1 is the whole fresh batch (the authors' code: "
            "'no samples in range filter, returning original batch'); the batch is then full, so X2 and X3 get no "
            "room. False: X1 stays empty and X2, X3 fill the batch."
        },
    )
    shared_buffer: bool = field(
        default=False,
        metadata={
            "help": "B_bad and B_high as the authors' code keeps them: one store of `difficult_buffer_size` groups "
            "(their max_total_uids), each stored rollout group one entry. Nothing leaves until the store is full; "
            "then each entry is classed by its latest accuracy (its re-evaluations', else its own): at most "
            "`high_quality_buffer_size` in the band [c2, c3] stay, the oldest (the stalest) leaving first; difficult "
            "ones beyond the rest leave oldest first; when still over, entries above both bands leave first. No "
            "entry leaves by age alone (`high_quality_buffer_steps` does not apply). Re-evaluation draws from entries "
            "that entered at mu <= c1, X3 from entries whose latest accuracy is in [c2, c3]. Needs "
            "difficult_entry_after_update=True and high_quality_buffer_size. False: the paper's two FIFO buffers."
        },
    )
    high_quality_buffer_size: int | None = field(
        default=None,
        metadata={
            "help": "Most high-quality groups B_high keeps (the authors' code: 8). With `shared_buffer` the cap "
            "applies once the store is full; otherwise B_high keeps at most this many of its last "
            "`high_quality_buffer_steps` steps. The oldest leave first. None: no cap."
        },
    )

    # Thresholds
    difficult_threshold: float | None = field(
        default=None,
        metadata={
            "help": "c1 in the paper: a prompt whose group accuracy is <= c1 enters B_bad; a re-evaluated prompt "
            "joins X2 when c1 < accuracy < 1. None means 1/8 (0 with `mini_test`)."
        },
    )
    high_quality_lower_range: list[float] | None = field(
        default=None,
        metadata={
            "help": "[c2_low, c2_high]: range of the lower accuracy bound c2 of B_high, moved by eq. 8 "
            "(c2 = r_tot * (c2_high - c2_low) + c2_low). Equal ends give a fixed threshold. None means "
            "[1/8, 4/8] ([1/2, 1/2] with `mini_test`)."
        },
    )
    high_quality_upper_range: list[float] | None = field(
        default=None,
        metadata={
            "help": "[c3_low, c3_high]: range of the upper accuracy bound c3 of B_high, moved by eq. 8. Must not "
            "lie below the c2 range. None means [2/8, 5/8] ([1/2, 1/2] with `mini_test`)."
        },
    )
    correctness_reward: str | None = field(
        default=None,
        metadata={
            "help": "What counts as a correct completion: the name of the reward function (as in TRL's "
            "`rewards/<name>/mean` log) whose value decides it, read on any scale. Group accuracy mu(x) (Algorithm "
            "1), the thresholds c1, c2, c3 and r_tot of eq. 8 then read the share of correct completions; advantages "
            "still come from all rewards. None: TRL's `accuracy_reward` or `reasoning_accuracy_reward` when exactly "
            "one is among the reward functions (known by name), else the only reward function once TRL's format, "
            "length and repetition rewards are set aside, when its first scored values lie in [0, 1]; with several "
            "and none stated, none: B_bad and B_high (X2, X3) stay off with one warning. Never picked from the first "
            "values among several rewards; saved in checkpoints (docs/method.md, 'Which completions are correct')."
        },
    )
    correctness_threshold: float = field(
        default=1.0,
        metadata={
            "help": "A completion is correct when the reward that decides correctness (`correctness_reward`, or the "
            "one found by its rule) is >= this value. With a partial credit {0, 0.5, 1}, 1.0 counts full credit "
            "only and 0.5 half-right answers too."
        },
    )
    non_finite_rewards: str = field(
        default="error",
        metadata={
            "help": "What a reward function's inf or -inf does: 'error' stops the run at once, naming the reward "
            "function and the values; 'none' reads it as a missing reward (None, as TRL reads None and NaN: the "
            "completion is scored by the other reward functions, or left out of the group's accuracy), counted in "
            "`bapo/non_finite_rewards`.",
            "choices": list(NON_FINITE_REWARDS),
        },
    )

    # Losses for stale data
    off_policy_correction: str = field(
        default="behavior",
        metadata={
            "help": "How the loss corrects for stale samples. 'behavior' (eq. 3): the clipped ratio is taken against "
            "the policy that generated each sample (alpha, or alpha_t' for replayed groups). 'decoupled' (the "
            "authors' code): the clipped ratio is taken against the policy at the start of the rollout step, "
            "measured for every row of the assembled batch, and each token's loss is weighed by "
            "min(pi_start / pi_behavior, importance_sampling_cap).",
            "choices": list(OFF_POLICY_CORRECTIONS),
        },
    )
    importance_sampling_cap: float = field(
        default=3.0,
        metadata={
            "help": "With off_policy_correction='decoupled': the truncation of the importance weight "
            "pi_start / pi_behavior (the authors' rollout_is_threshold: 3)."
        },
    )
    x3_anchor: str = field(
        default="start",
        metadata={
            "help": "With off_policy_correction='decoupled', what X3's clipped ratio is anchored at. 'start': "
            "pi_start of the step that trains it, the whole staleness in the importance weight "
            "min(pi_start / pi_behavior, cap). 'stored' (the authors' code): the policy that started the step "
            "the group was generated in, measured then and stored with it, with the importance weight of that "
            "moment, min(pi_start_then / pi_behavior, cap).",
            "choices": list(X3_ANCHORS),
        },
    )
    batch_aggregation: str = field(
        default="spread",
        metadata={
            "help": "How the assembled batch becomes optimizer steps. 'spread': over the configured steps "
            "(steps_per_generation / gradient_accumulation_steps), each normalised as `loss_type` says, so the "
            "learning rate scales a mean gradient whatever the batch fill. 'mini_batch' (the authors' code): "
            "mini-batches of a full step's rows (per_device_train_batch_size x gradient_accumulation_steps x "
            "processes), one optimizer step each, the steps left over skipped; each micro-batch's loss is its "
            "token mean times its rows over per_device_train_batch_size x gradient_accumulation_steps, so a "
            "partial mini-batch's step shrinks with its fill. For token-normalised loss types.",
            "choices": list(BATCH_AGGREGATIONS),
        },
    )
    kl_reference: str = field(
        default="behavior",
        metadata={
            "help": "What the KL term (weight `beta`) is measured against: 'behavior' is the policy that "
            "generated each sample (eq. 3), 'ref' is GRPO's frozen reference model. 'behaviour' is read as "
            "'behavior'.",
            "choices": list(KL_REFERENCES) + list(KL_REFERENCE_ALIASES),
        },
    )
    loss_type: str = field(
        default="dapo",
        metadata={
            "help": "A key of `trl_bapo.losses.LOSSES`, read when the config is built: every loss type of GRPOConfig "
            "('grpo', 'dr_grpo', 'dapo', 'bnpo', 'cispo', 'sapo', 'luspo', 'vespo'), plus the off-policy "
            "group-relative REINFORCE losses of arXiv 2509.24203, written for stale "
            "data: 'rec' (the variant in `rec_variant`), 'asymre' and 'opmd'. These three average their per-token "
            "loss over the micro-batch's tokens and use the advantages as TRL computes them (the paper's are "
            "not scaled by the group's standard deviation: scale_rewards='none')."
        },
    )
    rec_variant: str = field(
        default="oneside-nois",
        metadata={
            "help": "REC variant (loss_type='rec'): the loss is -A_hat * log pi on the tokens a clip keeps. "
            "'oneside-*' keeps a token unless its ratio pi/pi_old already moved past 1 + epsilon_high (A >= 0) or "
            "1 - epsilon_low (A <= 0); 'twoside-*' keeps 1 - epsilon_low <= ratio <= 1 + epsilon_high; 'ring-*' adds "
            "back tokens that moved far the wrong way (ratio <= 1 - rec_ring_epsilon_low with A >= 0, ratio >= 1 + "
            "rec_ring_epsilon_high with A <= 0). '*-nois': A_hat = A; '*-is': A_hat = A * ratio. The paper finds "
            "'oneside-nois' as good as GRPO.",
            "choices": list(REC_VARIANTS),
        },
    )
    rec_ring_epsilon_low: float = field(
        default=0.6, metadata={"help": "epsilon'_low of REC-Ring: A >= 0 tokens with ratio <= 1 - this keep loss."}
    )
    rec_ring_epsilon_high: float = field(
        default=2.0, metadata={"help": "epsilon'_high of REC-Ring: A <= 0 tokens with ratio >= 1 + this keep loss."}
    )
    asymre_tau: float = field(
        default=0.1,
        metadata={
            "help": "tau of AsymRE (loss_type='asymre'): the loss is -(A + tau) * log pi, REINFORCE with its baseline "
            "lowered by tau, which keeps the policy near the data it learns from."
        },
    )
    opmd_tau: float = field(
        default=0.2,
        metadata={
            "help": "tau of OPMD (loss_type='opmd'): the loss is -A * log pi + (tau / 2) * (log pi - log pi_old)^2, "
            "the mirror-descent regulariser towards the behavior policy (0.2 weighs the square by 0.1, as "
            "Trinity-RFT's example does)."
        },
    )
    adaptive_clipping: bool = field(
        default=False,
        metadata={
            "help": "Balanced Policy Optimization's adaptive clipping (arXiv 2510.18927): per micro-batch, choose the "
            "ratio bounds [low, high] of the clipped surrogate so that positive-advantage tokens' clipped "
            "contribution reaches `adaptive_clip_target` times the negative tokens', raising low first, then high; "
            "the sums are taken over all processes. Negative advantages get the dual clip "
            "`adaptive_clip_dual` (through TRL's `delta`). For loss types with a clipped token-level ratio (those "
            "`trl_bapo.losses.LOSSES` marks clipped: grpo, dr_grpo, bnpo, dapo); usable with BAPO's batches or "
            "without them."
        },
    )
    adaptive_clip_start: list[float] = field(
        default_factory=lambda: [0.6, 1.2], metadata={"help": "[low, high] bounds every search starts from."}
    )
    adaptive_clip_max: list[float] = field(
        default_factory=lambda: [0.8, 2.0], metadata={"help": "[low, high]: the most each bound is raised to."}
    )
    adaptive_clip_step: float = field(default=0.05, metadata={"help": "How much a bound is raised at a time."})
    adaptive_clip_target: float = field(
        default=1.0,
        metadata={"help": "Wanted ratio of the positive tokens' clipped contribution to the negative tokens'."},
    )
    adaptive_clip_dual: float = field(
        default=3.0,
        metadata={"help": "Dual-clip constant c: a negative-advantage token's ratio counts at most c."},
    )

    # Dynamic sampling (DAPO)
    dynamic_sampling: bool = field(
        default=False,
        metadata={
            "help": "DAPO's dynamic sampling: keep generating fresh prompt batches until the rollout holds as many "
            "groups with non-zero reward variance as a rollout batch has prompts, or until "
            "`dynamic_sampling_max_rounds` batches were generated. Usable on its own (with both replays off and "
            "rollout_delay=1 this is DAPO's sampler, to pair with epsilon_high=0.28 and loss_type='dapo') or with "
            "BAPO. Needs a map-style train dataset."
        },
    )
    dynamic_sampling_max_rounds: int = field(
        default=4,
        metadata={"help": "Most prompt batches generated per rollout step under `dynamic_sampling` (DAPO: 4)."},
    )

    # Rollout timing (not in the paper)
    rollout_sampling_seed: str = field(
        default="global",
        metadata={
            "help": "Where generation draws its randomness from. 'global': the global random state, as TRL samples "
            "(a rollout then depends on everything else that drew from it: dropout, evaluation). 'per_step': a "
            "generator of its own per engine call, seeded by (seed, rollout step, optimizer step, process, call), "
            "with dropout off while generating; a rollout then depends only on the policy that generates it. "
            "transformers' generate and the vLLM server; not colocated vLLM, whose G requests per prompt would "
            "share one seed."
        },
    )
    overlap_rollout: bool = field(
        default=False,
        metadata={
            "help": "Generate rollout step t+1 in the background while step t trains, where alpha (frozen for "
            "rollout_delay steps) is the policy that generates it. With transformers' generate the run is bit-equal "
            "to the one without overlap (tests/test_overlap.py, on CPU); on the vLLM server its completions are "
            "equal and its weights within the engine's log-prob noise (tests/real_vllm/test_server.py). It is "
            "faster only where generation and training run at once (bench/OVERLAP.md gives the ratios measured on "
            "CPU; no GPU ran it). "
            "Needs rollout_sampling_seed='per_step' and rollout_delay > 1; no prefetch at refresh steps, the last "
            "step, epoch ends or before an evaluation. transformers' generate (on a copy of alpha, which costs "
            "one model's memory) or a vLLM server, on one process for the server; not with colocated vLLM, PEFT on "
            "transformers' generate, "
            "FSDP, ZeRO-3, tools or environments. See docs/overlap.md."
        },
    )

    # Resume
    resume_without_bapo_state: bool = field(
        default=False,
        metadata={
            "help": "When resuming from a checkpoint that has no readable BAPO state (buffers, thresholds, rollout "
            "snapshot), start with empty buffers instead of failing. Off by default so a resume never resets "
            "them silently."
        },
    )

    # What BAPO did
    track_prompts: bool = field(
        default=False,
        metadata={
            "help": "Measure each evaluation prompt's accuracy over G samples before training and at every "
            "evaluation, and write one record per measurement to output_dir/prompt_tracking.jsonl: per-prompt "
            "accuracy, counts at 0/G .. G/G (the paper's fig. 7), migration between them (fig. 15), prompts "
            "unlocked and relocked against the baseline, the most improved prompts. Needs an eval_dataset and an "
            "eval_strategy other than 'no'."
        },
    )
    log_buffer_snapshots: bool = field(
        default=False,
        metadata={
            "help": "At every logging step, append what B_bad and B_high hold to output_dir/bapo_buffers.jsonl: "
            "each prompt or group with its accuracy, the rollout step it entered, its age and how often it was "
            "re-evaluated or replayed. Every checkpoint gets the same lines in its own bapo_buffers.jsonl either way."
        },
    )

    def __post_init__(self):
        if self.kl_reference in KL_REFERENCE_ALIASES:
            logger.info("kl_reference=%r is read as %r.", self.kl_reference, KL_REFERENCE_ALIASES[self.kl_reference])
            self.kl_reference = KL_REFERENCE_ALIASES[self.kl_reference]
        self._validate_bapo_fields()
        super().__post_init__()
        # vLLM holds the rollout policy, alpha; TRL's sleep mode would hand it the current policy after every step.
        if self.use_vllm and self.vllm_enable_sleep_mode and self.rollout_delay > 1:
            raise ValueError(
                "vllm_enable_sleep_mode=True frees the engine's weights after every generation, and TRL then sends "
                "it the current policy, while BAPO's rollouts need alpha, the policy of "
                f"rollout_delay={self.rollout_delay} steps back. Set vllm_enable_sleep_mode=False, or rollout_delay=1."
            )
        tensor_parallel = getattr(self, "vllm_tensor_parallel_size", 1)
        if self.use_vllm and self.vllm_mode == "colocate" and tensor_parallel > 1 and self.bapo_assembles_batches:
            raise ValueError(
                f"vllm_tensor_parallel_size={tensor_parallel} with colocated vLLM has not run with BAPO, which sends "
                "the engine alpha through each worker's weight reload (trl_bapo.vllm_sync); it needs several GPUs, "
                "which these machines lack. Use vllm_mode='server' (the server's tensor parallelism is its own), or "
                "vllm_tensor_parallel_size=1."
            )
        self._validate_rollout_timing()
        if self.use_liger_kernel:
            raise ValueError(
                "use_liger_kernel=True is not supported by BAPOTrainer: TRL 1.16 deprecates it (use "
                "model_init_kwargs={'use_kernels': True}), it needs triton (a GPU), and nothing here has run it with "
                "BAPO's delayed rollout policy. Set use_liger_kernel=False."
            )
        # BAPO cuts its batch into whole optimizer steps, each of gradient_accumulation_steps micro-batches.
        if self.steps_per_generation % self.gradient_accumulation_steps:
            raise ValueError(
                f"steps_per_generation ({self.steps_per_generation}) must be a multiple of "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps}): BAPO cuts each assembled batch "
                "into whole optimizer steps. Set generation_batch_size (or steps_per_generation) to a multiple of "
                "per_device_train_batch_size x processes x gradient_accumulation_steps."
            )
        self._warn_small_batch()

    def _warn_small_batch(self) -> None:
        """Warns when a rollout batch holds fewer than `MIN_BATCH_PROMPTS` prompts while the filter or a buffer is on:
        TRL's defaults (8 completions per device, 8 generations, 1 accumulation step) give B = 1 on one process.
        A Python warning, not a log line: a config built once warns once, and the logged warnings stay those of the
        options it ignores."""
        prompts = self.generation_batch_size // self.num_generations
        filtering = self.online_filter != "none" or self.use_difficult_replay or self.use_high_quality_replay
        if prompts >= MIN_BATCH_PROMPTS or not filtering:
            return
        warnings.warn(
            f"A rollout batch holds B = generation_batch_size / num_generations = {self.generation_batch_size} / "
            f"{self.num_generations} = {prompts} prompt(s), with generation_batch_size = per_device_train_batch_size "
            f"({self.per_device_train_batch_size}) x processes ({self.world_size}) x steps_per_generation "
            f"({self.steps_per_generation}, by default gradient_accumulation_steps, here "
            f"{self.gradient_accumulation_steps}). BAPO's online filter and buffers cannot work with so few prompts: "
            "X1 keeps or drops whole groups of them, B_bad holds one rollout batch of prompts by default, and X3 only "
            f"fills what X1 leaves of B. Raise B to at least {MIN_BATCH_PROMPTS} (per_device_train_batch_size, "
            "gradient_accumulation_steps or steps_per_generation, generation_batch_size, fewer num_generations, or "
            "more processes; the paper's B is 256), or switch them off (online_filter='none', "
            "use_difficult_replay=False, use_high_quality_replay=False).",
            UserWarning,
            stacklevel=4,
        )

    @property
    def bapo_assembles_batches(self) -> bool:
        """Whether the training batch differs from the fresh rollout (anything but GRPO's settings)."""
        return (
            self.rollout_delay > 1
            or self.online_filter != "none"
            or self.use_difficult_replay
            or self.use_high_quality_replay
            or self.dynamic_sampling
        )

    def _validate_bapo_fields(self) -> None:
        for name in (
            "rollout_delay",
            "reevaluation_interval",
            "max_reevaluation_prompts",
            "high_quality_buffer_steps",
            "dynamic_sampling_max_rounds",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        for name, meaning in (
            ("difficult_buffer_size", "one rollout batch of prompts"),
            ("high_quality_buffer_size", "no cap"),
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be None ({meaning}) or an integer >= 1, got {value!r}.")
        phase = self.rollout_refresh_phase
        if not isinstance(phase, int) or isinstance(phase, bool) or not 0 <= phase < self.rollout_delay:
            raise ValueError(
                f"rollout_refresh_phase must be an integer in [0, rollout_delay={self.rollout_delay}), got "
                f"{phase!r}: alpha is refreshed when (t - phase) mod v == 0. The authors' code uses 1."
            )
        self._validate_authors_rules()
        self._warn_ignored_options()
        for name, choices in (
            ("online_filter", ONLINE_FILTERS),
            ("reevaluation_order", REEVALUATION_ORDERS),
            ("difficult_admission", DIFFICULT_ADMISSIONS),
            ("off_policy_correction", OFF_POLICY_CORRECTIONS),
            ("x3_anchor", X3_ANCHORS),
            ("batch_aggregation", BATCH_AGGREGATIONS),
            ("non_finite_rewards", NON_FINITE_REWARDS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}.")
        if not (math.isfinite(self.importance_sampling_cap) and self.importance_sampling_cap >= 1):
            raise ValueError(
                f"importance_sampling_cap must be a finite number >= 1, got {self.importance_sampling_cap!r}; a cap "
                "below 1 would shrink even on-policy tokens. The authors' code uses 3."
            )
        if self.off_policy_correction == "decoupled" and self.loss_type == "vespo":
            raise ValueError(
                "off_policy_correction='decoupled' weighs each token's loss by its importance weight, which "
                "loss_type='vespo' folds into its own sequence weights; use another loss type or "
                "off_policy_correction='behavior'."
            )
        if self.kl_reference not in KL_REFERENCES:
            raise ValueError(f"kl_reference must be one of {KL_REFERENCES}, got {self.kl_reference!r}.")
        if self.track_prompts and self.eval_strategy in ("no", None):
            raise ValueError(
                "track_prompts=True measures the evaluation prompts at every evaluation, but eval_strategy='no' "
                "never evaluates. Set eval_strategy='steps' (with eval_steps) or 'epoch', or track_prompts=False."
            )
        if self.kl_reference == "behavior" and self.sync_ref_model:
            raise ValueError(
                "sync_ref_model=True syncs a frozen reference model, but kl_reference='behavior' measures the KL "
                "against the behavior policy and keeps no reference model; set kl_reference='ref' or "
                "sync_ref_model=False."
            )
        self._validate_losses()
        if not math.isfinite(self.correctness_threshold):
            raise ValueError(f"correctness_threshold must be a finite number, got {self.correctness_threshold!r}.")
        # TRL settings that normalise over each rollout batch rather than over each group.
        for name, value in (("scale_rewards", "batch"), ("multi_objective_aggregation", "normalize_then_sum")):
            if getattr(self, name) == value and self.bapo_assembles_batches:
                raise ValueError(
                    f"{name}={value!r} normalises advantages over each rollout TRL scores, but BAPO trains on a batch "
                    "assembled from several rollouts (X1, X2, X3), so rows would be scaled over three different sets "
                    "rather than over the batch (Algorithm 1, line 18). Use scale_rewards='group' (the paper's) or "
                    "'none' and multi_objective_aggregation='sum_then_normalize', or switch BAPO's batch assembly off "
                    "(online_filter='none', rollout_delay=1 and both replays off)."
                )
        self._validate_sampling()
        if not 0 <= self.online_filter_gaussian_mean <= 1:
            raise ValueError(
                f"online_filter_gaussian_mean must lie in [0, 1], the range of a group's accuracy, got "
                f"{self.online_filter_gaussian_mean!r}; the paper centres it at 0.5."
            )
        if not self.online_filter_gaussian_std > 0:
            raise ValueError(
                f"online_filter_gaussian_std must be > 0, got {self.online_filter_gaussian_std!r}; the paper uses 0.2."
            )
        if not 0 < self.online_filter_uniform_keep <= 1:
            raise ValueError(
                f"online_filter_uniform_keep must be in (0, 1], got {self.online_filter_uniform_keep!r}; "
                "the paper keeps 0.6."
            )
        if self.mini_test:
            # mini_test's own values pass: a config written out and read back holds them.
            explicit = [
                name
                for name, value in zip(THRESHOLD_FIELDS, MINI_TEST_THRESHOLDS)
                if getattr(self, name) not in (None, value)
            ]
            if explicit:
                raise ValueError(
                    f"mini_test=True fixes the thresholds itself (c1 = 0, c2 = c3 = 1/2) but {', '.join(explicit)} "
                    "was set; unset it or set mini_test=False."
                )
            if self.online_filter != "range":
                raise ValueError(
                    f"mini_test=True uses the range filter for X1, but online_filter={self.online_filter!r}; "
                    "leave online_filter='range' or set mini_test=False."
                )
        # Unset thresholds take Table 3's values, or mini_test's: from here on each field holds its value.
        for name, value in zip(THRESHOLD_FIELDS, MINI_TEST_THRESHOLDS if self.mini_test else DEFAULT_THRESHOLDS):
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("high_quality_lower_range", "high_quality_upper_range"):
            value = getattr(self, name)
            if len(value) != 2:
                raise ValueError(f"{name} takes exactly two numbers [low, high], got {value!r}.")
        if not 0 <= self.difficult_threshold < 1:
            raise ValueError(
                f"difficult_threshold (c1) must be in [0, 1), got {self.difficult_threshold!r}; a prompt at c1 or "
                "below counts as difficult, so c1 = 1 would make every prompt difficult."
            )
        c2, c3 = self.high_quality_lower_range, self.high_quality_upper_range
        for name, (low, high) in (("high_quality_lower_range", c2), ("high_quality_upper_range", c3)):
            if not (0 <= low <= 1 and 0 <= high <= 1):
                raise ValueError(f"{name} must lie in [0, 1], got [{low}, {high}].")
            if low > high:
                raise ValueError(f"{name} is reversed: [{low}, {high}]; write it as [{high}, {low}].")
        if self.difficult_threshold > c2[0] and self.use_high_quality_replay:
            raise ValueError(
                f"difficult_threshold (c1) = {self.difficult_threshold} lies above the lower edge of the c2 range "
                f"(high_quality_lower_range[0] = {c2[0]}): a group between them would count as difficult (B_bad) "
                f"and as high quality (B_high) at once. Set difficult_threshold <= {c2[0]} (the paper: both 1/8), "
                "raise high_quality_lower_range, or switch X3 off (use_high_quality_replay=False)."
            )
        if c2[0] > c3[0] or c2[1] > c3[1]:
            raise ValueError(
                f"high_quality_lower_range (c2) {list(c2)} must not lie above high_quality_upper_range (c3) "
                f"{list(c3)} at either end, otherwise c2 > c3 and B_high is empty."
            )

    def _validate_sampling(self) -> None:
        """Settings that make generation sample from another distribution than the temperature-scaled softmax, the
        one whose log-probs the trainer computes as behavior log-probs (TRL #6789): BAPO's importance ratio against
        alpha or a stored policy (eq. 3) would divide by the wrong probabilities for every delayed or replayed row."""
        changed = {
            "top_p": self.top_p < 1.0,
            "top_k": bool(self.top_k),
            "min_p": self.min_p is not None,
            "repetition_penalty": self.repetition_penalty != 1.0,
        }
        # Read before transformers parses a JSON string given on the command line into a dict.
        kwargs = self.generation_kwargs
        kwargs = json.loads(kwargs) if isinstance(kwargs, str) else kwargs or {}
        changed.update({f"generation_kwargs[{key!r}]": True for key in kwargs if key in SAMPLING_KWARGS})
        changed["vllm_structured_outputs_regex"] = getattr(self, "vllm_structured_outputs_regex", None) is not None
        named = [name for name, is_set in changed.items() if is_set]
        if named and (self.rollout_delay > 1 or self.use_high_quality_replay):
            raise ValueError(
                f"{', '.join(named)} makes generation sample from a truncated or penalised distribution, but the "
                "behavior log-probs BAPO's importance ratio divides by (eq. 3) are the temperature-scaled softmax the "
                "trainer computes, so every delayed or replayed sample would be weighted wrongly. Sample with "
                "top_p=1.0, top_k=0, min_p=None and repetition_penalty=1.0 (the paper's Table 3), or train on fresh "
                "samples of the current policy only (rollout_delay=1, use_high_quality_replay=False)."
            )

    def _validate_rollout_timing(self) -> None:
        if self.rollout_sampling_seed not in ROLLOUT_SAMPLING_SEEDS:
            raise ValueError(
                f"rollout_sampling_seed must be one of {list(ROLLOUT_SAMPLING_SEEDS)}, got "
                f"{self.rollout_sampling_seed!r}."
            )
        per_step = self.rollout_sampling_seed == "per_step"
        if per_step and self.use_vllm and self.vllm_mode == "colocate":
            raise ValueError(
                "rollout_sampling_seed='per_step' seeds each vLLM request, and colocated vLLM sends each of a "
                "prompt's G completions as its own request with TRL's one set of sampling parameters: all G would "
                "share the seed and be identical. Use vllm_mode='server', transformers' generate (use_vllm=False), or "
                "rollout_sampling_seed='global'."
            )
        if per_step and self.use_transformers_continuous_batching:
            raise ValueError(
                "rollout_sampling_seed='per_step' samples through transformers' generate, which continuous batching "
                "(use_transformers_continuous_batching) does not call. Switch one of them off."
            )
        if self.overlap_rollout and not per_step:
            raise ValueError(
                "overlap_rollout=True generates in the background while the trainer draws from the global random "
                "state (dropout, evaluation), so a background draw from it would change both. Set "
                "rollout_sampling_seed='per_step'."
            )
        if self.overlap_rollout and self.rollout_delay == 1:
            raise ValueError(
                "overlap_rollout=True prefetches inside a delay window, where alpha is frozen; with rollout_delay=1 "
                "every rollout step takes the policy just trained, so nothing can be generated ahead. Set "
                "rollout_delay > 1 (the paper: 5) or overlap_rollout=False."
            )

    def _warn_ignored_options(self) -> None:
        """One warning per option a user set (a value other than its default) that another option switches off."""
        defaults = {f.name: f.default for f in fields(self) if f.default is not MISSING}
        difficult_off = "use_difficult_replay=False (no X2)"
        high_quality_off = "use_high_quality_replay=False (no X3)"
        filter_off = f"online_filter={self.online_filter!r}"
        ignored = {
            "high_quality_buffer_steps": self.shared_buffer and "shared_buffer=True (nothing leaves by age)",
            "reevaluation_interval": not self.use_difficult_replay and difficult_off,
            "max_reevaluation_prompts": not self.use_difficult_replay and difficult_off,
            "reevaluation_order": not self.use_difficult_replay and difficult_off,
            "difficult_admission": not self.use_difficult_replay and difficult_off,
            "keep_reevaluated_prompts": not self.use_difficult_replay and difficult_off,
            "cap_difficult_replay": not self.use_difficult_replay and difficult_off,
            "high_quality_buffer_size": not self.use_high_quality_replay
            and not self.shared_buffer
            and high_quality_off,
            "online_filter_gaussian_mean": self.online_filter != "gaussian" and filter_off,
            "online_filter_gaussian_std": self.online_filter != "gaussian" and filter_off,
            "online_filter_uniform_keep": self.online_filter != "uniform" and filter_off,
            "dynamic_sampling_max_rounds": not self.dynamic_sampling and "dynamic_sampling=False",
        }
        for name, switch in ignored.items():
            if switch and getattr(self, name) != defaults[name]:
                logger.warning(
                    "%s=%r is ignored with %s; unset it, or change that option.", name, getattr(self, name), switch
                )

    def _validate_authors_rules(self) -> None:
        """Combinations of the authors' options that have no meaning, refused with the setting that fixes them."""
        if self.shared_buffer:
            if not self.difficult_entry_after_update:
                raise ValueError(
                    "shared_buffer=True stores every group at the end of its rollout step, as the authors' code does "
                    "after the update; set difficult_entry_after_update=True with it."
                )
            if self.high_quality_buffer_size is None:
                raise ValueError(
                    "shared_buffer=True needs high_quality_buffer_size, the most high-quality groups the full store "
                    "keeps (the authors' code: 8)."
                )
            capacity = self.difficult_buffer_size
            if capacity is not None and self.high_quality_buffer_size >= capacity:
                raise ValueError(
                    f"high_quality_buffer_size ({self.high_quality_buffer_size}) must be below difficult_buffer_size "
                    f"({capacity}) with shared_buffer=True: the store's other entries hold B_bad "
                    "(the authors' code: 8 of 128)."
                )
        if self.x3_anchor == "stored" and self.off_policy_correction != "decoupled":
            raise ValueError(
                "x3_anchor='stored' anchors X3's ratio under the decoupled correction; with "
                f"off_policy_correction={self.off_policy_correction!r} the ratio is already taken against the "
                "policy that generated each group. Set off_policy_correction='decoupled' or x3_anchor='start'."
            )

    def _validate_losses(self) -> None:
        level = getattr(self, "importance_sampling_level", "token")
        if self.loss_type not in LOSSES:
            raise ValueError(
                f"loss_type must be one of {list(LOSSES)} (trl_bapo.losses.LOSSES), got {self.loss_type!r}."
            )
        normalisation = LOSSES[self.loss_type].normalisation
        if self.batch_aggregation == "mini_batch" and normalisation not in ("token", "global"):
            raise ValueError(
                "batch_aggregation='mini_batch' takes each micro-batch's token mean, but "
                f"loss_type={self.loss_type!r} normalises per {normalisation}; use a token-normalised loss type "
                f"({', '.join(n for n, loss in LOSSES.items() if loss.normalisation in ('token', 'global'))}) or "
                "batch_aggregation='spread'."
            )
        # The table is read here, not at import, so a loss added to it later is checked as its entry says.
        if LOSSES[self.loss_type].per_token is not None:
            if self.rec_variant not in REC_VARIANTS:
                raise ValueError(f"rec_variant must be one of {list(REC_VARIANTS)}, got {self.rec_variant!r}.")
            for name in ("rec_ring_epsilon_low", "rec_ring_epsilon_high", "asymre_tau", "opmd_tau"):
                value = getattr(self, name)
                if not (math.isfinite(value) and value >= 0):
                    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
            unsupported = {
                "importance_sampling_level": level != "token",
                "use_adaptive_entropy": self.use_adaptive_entropy,
                "top_entropy_quantile": self.top_entropy_quantile < 1.0,
                "off_policy_mask_threshold": self.off_policy_mask_threshold is not None,
                "delta": self.delta is not None,
                "adaptive_clipping": self.adaptive_clipping,
            }
            named = [name for name, set_ in unsupported.items() if set_]
            if named:
                raise ValueError(
                    f"loss_type={self.loss_type!r} is a token-level REINFORCE loss without TRL's clipped ratio; "
                    f"{', '.join(named)} applies to TRL's own loss types only. Leave it at its default, or pick a "
                    "TRL loss type."
                )
        if not self.adaptive_clipping:
            return
        clipped = [name for name, loss in LOSSES.items() if loss.clipped]
        if not LOSSES[self.loss_type].clipped or level != "token":
            raise ValueError(
                "adaptive_clipping sets the bounds of a clipped token-level ratio, which "
                f"loss_type={self.loss_type!r} with importance_sampling_level={level!r} does not have; use "
                f"loss_type in {clipped} with importance_sampling_level='token', or adaptive_clipping=False."
            )
        if self.delta is not None:
            raise ValueError(
                f"adaptive_clipping applies its dual clip through TRL's delta, which is set to {self.delta!r}; leave "
                "delta unset and choose the constant with adaptive_clip_dual."
            )
        for name in ("adaptive_clip_start", "adaptive_clip_max"):
            if len(getattr(self, name)) != 2:
                raise ValueError(f"{name} takes exactly two numbers [low, high], got {getattr(self, name)!r}.")
        (low, high), (low_max, high_max) = self.adaptive_clip_start, self.adaptive_clip_max
        if not 0 < low <= low_max <= 1 <= high <= high_max <= self.adaptive_clip_dual:
            raise ValueError(
                "adaptive clipping needs 0 < adaptive_clip_start[0] <= adaptive_clip_max[0] <= 1 <= "
                "adaptive_clip_start[1] <= adaptive_clip_max[1] <= adaptive_clip_dual, got start "
                f"{self.adaptive_clip_start}, max {self.adaptive_clip_max}, dual {self.adaptive_clip_dual}."
            )
        if not self.adaptive_clip_step > 0 or not self.adaptive_clip_target > 0:
            raise ValueError(
                f"adaptive_clip_step and adaptive_clip_target must be > 0, got {self.adaptive_clip_step!r} and "
                f"{self.adaptive_clip_target!r}."
            )


def _parameters_block(config: type, base: type) -> str:
    """The `Parameters:` section of `config`'s docstring, as TRL writes GRPOConfig's (grouped under `HEADINGS`), from
    the help of each field that `config` adds to `base`: the fields' help stays the one source of their docs."""
    by_name = {f.name: f for f in fields(config)}
    lines = ["", "    Parameters:"]
    for heading, names in HEADINGS.items():
        lines += ["", f"        > {heading}", ""]
        for name in names:
            f = by_name[name]
            default = f.default if f.default is not MISSING else f.default_factory()
            lines.append(f"        {f.name} (`{f.type}`, *optional*, defaults to `{default!r}`):")
            lines += textwrap.wrap(f.metadata["help"], 119, initial_indent=" " * 12, subsequent_indent=" " * 12)
    return "\n".join(lines) + "\n"


BAPOConfig.__doc__ += _parameters_block(BAPOConfig, GRPOConfig)
