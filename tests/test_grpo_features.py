"""GRPOTrainer features that BAPOTrainer inherits, each trained through `trainer.train()` on the tiny model with
BAPO's defaults that matter: a delayed rollout policy (alpha swapped in for generation) and both replays on.

Every loss a test checks is recomputed by hand from a forward pass of our own, over each optimizer step's rows:
BAPO cuts its assembled batch its own way, so each TRL loss type must still be normalised over the whole batch.
Where a feature changes how completions are generated, the test also checks the weights each engine call ran with:
alpha's for a stale step's fresh rollout, the trained policy's for re-evaluation.
"""

import asyncio
import math
from collections import defaultdict

import pytest
import torch
from conftest import ScriptedReward, bapo_logs, batch_completion_logps, make_config, parameters, prompt_dataset
from datasets import Dataset
from transformers import Qwen2ForCausalLM

from trl_bapo import BAPOTrainer
from trl_bapo.builtin.tiny import build_model, build_tokenizer, text_config, warm_start

# Per prompt, how many of its 4 completions are correct the n-th time it is scored: "a" prompts enter B_bad and are
# partly solved when re-evaluated (X2), "b" and "d" are mixed, "c" are high-quality groups that X3 replays.
PLAN = {f"{t}{name}=": ks for t in range(8) for name, ks in zip("abcd", [[0, 2], [2], [2], [1]])}
# A delayed rollout policy (v = 2: every other rollout step generates with a stale alpha), re-evaluation every other
# step, and B_high's ranges narrowed so that X3 replays groups of earlier steps within a few steps.
BAPO = dict(
    rollout_delay=2,
    reevaluation_interval=2,
    high_quality_lower_range=[0.25, 0.25],
    high_quality_upper_range=[0.5, 0.5],
)


def changed(before: dict, after: dict) -> int:
    return sum(not torch.equal(before[name], after[name]) for name in before)


def build(model, output_dir, reward_funcs=None, dataset=None, trainer_kwargs=None, **overrides) -> BAPOTrainer:
    """A BAPOTrainer on PLAN's prompts (or `dataset`), 4 optimizer steps, fp32 (losses are compared exactly)."""
    settings = dict(max_steps=4, learning_rate=5e-2, bf16=False, **BAPO)
    args = make_config(output_dir, **{**settings, **overrides})
    return BAPOTrainer(
        model=model,
        reward_funcs=reward_funcs if reward_funcs is not None else ScriptedReward(PLAN),
        args=args,
        train_dataset=dataset if dataset is not None else prompt_dataset(list(PLAN)),
        **(trainer_kwargs or {}),
    )


class GenerationWeights:
    """Records the weights the model generates with at every engine call (TRL's `_generate_single_turn`, one per
    turn, or a `rollout_func`), grouped by the scoring call (`_generate_and_score_completions`) they belong to, and
    the weights trained at each optimizer step. The output embedding tells the policies apart."""

    def __init__(self, trainer):
        self.trainer, self.param = trainer, trainer.model.get_output_embeddings().weight
        # Per optimizer step, per scoring call (a fresh rollout, a re-evaluation), the weights of each engine call.
        self.generated: dict[int, list[list[torch.Tensor]]] = defaultdict(list)
        self.trained: dict[int, torch.Tensor] = {}
        score, compute_loss = trainer._generate_and_score_completions, trainer.compute_loss

        def recording_score(*args, **kwargs):
            self.generated[trainer.state.global_step + 1].append([])
            return score(*args, **kwargs)

        def recording_compute_loss(model, inputs, *args, **kwargs):
            self.trained.setdefault(trainer.state.global_step + 1, self.param.detach().clone())
            return compute_loss(model, inputs, *args, **kwargs)

        trainer._generate_and_score_completions = recording_score
        trainer.compute_loss = recording_compute_loss
        trainer._generate_single_turn = self.recording(trainer._generate_single_turn)
        if trainer.rollout_func is not None:
            trainer.rollout_func = self.recording(trainer.rollout_func)

    def recording(self, engine):
        def recording_engine(*args, **kwargs):
            self.generated[self.trainer.state.global_step + 1][-1].append(self.param.detach().clone())
            return engine(*args, **kwargs)

        return recording_engine

    def check(self, logs) -> None:
        """Every engine call of a step's fresh rollout generated with alpha, the weights of the step alpha was taken
        at (`policy_lag` steps back), and every call of its re-evaluation with the policy being trained."""
        stale = 0
        for log in logs:
            step, lag = log["step"], int(log["bapo/policy_lag"])
            (fresh, *reevaluations), alpha = self.generated[step], self.trained[step - lag]
            assert fresh and all(torch.equal(weights, alpha) for weights in fresh), step
            assert all(torch.equal(weights, self.trained[step]) for calls in reevaluations for weights in calls)
            stale += lag > 0 and not torch.equal(alpha, self.trained[step])
        assert stale, "alpha never differed from the trained policy"


# ---- TRL's losses, recomputed ----------------------------------------------------------------------------------


def trl_per_token_loss(trainer, logps, old, advantages, mask, entropy_mask=None):
    """TRL's per-token loss (trl 1.16.0, `GRPOTrainer._compute_loss`) for the trainer's loss type and options, from
    the current log-probs `logps` and the behavior log-probs `old`, as a (rows, tokens) tensor."""
    args, loss_type = trainer.args, trainer.loss_type
    log_ratio = logps - old
    if args.importance_sampling_level == "sequence":  # GSPO: one ratio per sequence, the mean of its log-ratios
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        clipped = ratio.clamp(1 - trainer.epsilon_low, 1 + trainer.epsilon_high)
        if args.delta is not None:  # INTELLECT-2's two-sided clip
            ratio = ratio.clamp(max=args.delta)
        per_token = -torch.min(ratio * advantages, clipped * advantages)
    elif loss_type == "cispo":
        per_token = -ratio.clamp(max=trainer.epsilon_high) * advantages * logps
    elif loss_type == "sapo":
        temperature = torch.where(advantages > 0, args.sapo_temperature_pos, args.sapo_temperature_neg)
        per_token = -torch.sigmoid(temperature * (ratio - 1)) * 4 / temperature * advantages
    elif loss_type == "vespo":
        weights = trainer.get_gamma_weights(
            advantages,
            logps - old,
            mask,
            None,
            args.vespo_k_pos,
            args.vespo_lambda_pos,
            args.vespo_k_neg,
            args.vespo_lambda_neg,
        )
        per_token = -weights * advantages * logps
    else:
        raise AssertionError(f"no oracle for loss_type={loss_type!r}")
    if args.off_policy_mask_threshold is not None:  # DeepSeek-V3.2's off-policy sequence mask
        kl = ((old - logps) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        per_token = per_token * ((advantages >= 0) | (kl <= args.off_policy_mask_threshold))
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    return per_token.expand_as(logps)


def batch_loss(loss_type, row_sums, row_tokens, max_completion_length):
    """TRL's normalisation of a loss type over one optimizer step's rows, all of them in one batch."""
    if loss_type in ("grpo", "sapo"):
        return (row_sums / row_tokens.clamp(min=1)).mean()
    if loss_type == "dr_grpo":
        return row_sums.sum() / (len(row_sums) * max_completion_length)
    if loss_type == "luspo":
        return row_sums.mean()
    if loss_type in ("bnpo", "dapo", "cispo", "vespo"):
        return row_sums.sum() / row_tokens.sum().clamp(min=1)
    raise AssertionError(loss_type)


class LossCheck:
    """Wraps `trainer.compute_loss`: per optimizer step, adds up the losses the trainer returned for its micro-batches
    and, per row, TRL's per-token loss recomputed by hand against the row's behavior log-probs. `variants` are
    option overrides whose loss is recomputed too, to show that an option changed the loss."""

    def __init__(self, trainer, variants=()):
        self.trainer = trainer
        self.steps = defaultdict(
            lambda: {"returned": 0.0, "sums": [], "tokens": [], "variants": defaultdict(list), "log_ratio": 0.0}
        )
        self.inputs: list[tuple[int, dict]] = []
        self.largest_log_ratio = 0.0
        self.entropy_masks: list[torch.Tensor] = []
        original = trainer.compute_loss
        high_entropy_mask = trainer.get_high_entropy_mask

        def recording_high_entropy_mask(*args, **kwargs):
            mask = high_entropy_mask(*args, **kwargs)
            self.entropy_masks.append(mask)
            return mask

        def checking_compute_loss(model, inputs, *args, **kwargs):
            step = trainer.state.global_step + 1
            logps = batch_completion_logps(trainer.model, inputs)
            old = inputs.get("old_per_token_logps", logps)
            mask = inputs["completion_mask"].float() * inputs.get("tool_mask", torch.ones_like(logps))
            log_ratio = float(((logps - old) * mask).abs().max())
            self.largest_log_ratio = max(self.largest_log_ratio, log_ratio)
            entropies = len(self.entropy_masks)
            loss = original(model, inputs, *args, **kwargs)
            entropy_mask = self.entropy_masks[-1] if len(self.entropy_masks) > entropies else None
            advantages = inputs["advantages"].unsqueeze(1)
            per_token = trl_per_token_loss(trainer, logps, old, advantages, mask, entropy_mask)
            record = self.steps[step]
            record["returned"] += float(loss.detach())
            record["log_ratio"] = max(record["log_ratio"], log_ratio)
            record["sums"].append((per_token * mask).sum(-1))
            record["tokens"].append(mask.sum(-1))
            for name, overrides in variants:
                saved = {key: getattr(trainer.args, key) for key in overrides}
                for key, value in overrides.items():
                    setattr(trainer.args, key, value)
                try:
                    variant = trl_per_token_loss(trainer, logps, old, advantages, mask, None)
                finally:
                    for key, value in saved.items():
                        setattr(trainer.args, key, value)
                record["variants"][name].append((variant * mask).sum(-1))
            self.inputs.append((step, inputs))
            return loss

        trainer.compute_loss = checking_compute_loss
        trainer.get_high_entropy_mask = recording_high_entropy_mask

    def expected(self, record, sums=None):
        sums = torch.cat(sums if sums is not None else record["sums"])
        tokens = torch.cat(record["tokens"])
        return float(batch_loss(self.trainer.loss_type, sums, tokens, self.trainer.max_completion_length))

    def check(self):
        """Every optimizer step's loss is the recomputed one; returns, per variant, the largest difference a variant
        made to a step's loss."""
        assert self.steps, "no loss was computed"
        differences = defaultdict(float)
        for step, record in self.steps.items():
            expected = self.expected(record)
            assert record["returned"] == pytest.approx(expected, rel=1e-4, abs=1e-6), (step, record["returned"])
            for name, sums in record["variants"].items():
                differences[name] = max(differences[name], abs(self.expected(record, sums) - expected))
        return differences


# ---- loss types and importance-sampling level ------------------------------------------------------------------


def train_checked(trainer, loss: bool = True) -> tuple:
    """Trains `trainer` with every engine call's weights recorded and, with `loss`, every optimizer step's loss
    recomputed by hand; checks both. Returns the loss check (None without `loss`), the weights record, the per-step
    logs and the weights before training."""
    check = LossCheck(trainer) if loss else None
    weights = GenerationWeights(trainer)
    before = parameters(trainer.model)
    trainer.train()
    if check is not None:
        check.check()
    logs = bapo_logs(trainer)
    weights.check(logs)
    return check, weights, logs, before


LOSS_TYPES = {
    "dr_grpo": dict(loss_type="dr_grpo"),
    "cispo": dict(loss_type="cispo", epsilon_high=1.2),
    "sapo": dict(loss_type="sapo"),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "vespo": dict(loss_type="vespo"),
    "grpo-sequence": dict(loss_type="grpo", importance_sampling_level="sequence"),
}
# What TRL logs only for a given loss type.
LOSS_METRICS = {"cispo": "cispo_clip_ratio", "vespo": "vespo/phi_seq_mean", "dr_grpo": "clip_ratio/region_mean"}


@pytest.mark.parametrize("name", list(LOSS_TYPES))
def test_trl_loss_type_is_normalised_over_the_assembled_batch(name, tiny_model_path, tmp_path):
    """Each optimizer step's loss, summed over its micro-batches, is TRL's loss of the loss type over the step's whole
    batch, with the ratio taken against each row's behavior policy (alpha's for stale X1 and X3 rows); with
    `importance_sampling_level="sequence"`, GSPO's one ratio per sequence, not the token-level one."""
    overrides = LOSS_TYPES[name]
    trainer = build(tiny_model_path, tmp_path, **overrides)
    variants = [("token-level", dict(importance_sampling_level="token"))] if "sequence" in str(overrides) else []
    check = LossCheck(trainer, variants)
    before = parameters(trainer.model)
    trainer.train()
    differences = check.check()
    logs = bapo_logs(trainer)
    assert len(check.steps) == 4 and check.largest_log_ratio > 0.05, "no stale row was trained on"
    assert sum(log["bapo/x2"] for log in logs) > 0 and sum(log["bapo/x3"] for log in logs) > 0
    assert max(log["bapo/policy_lag"] for log in logs) > 0, "alpha was never stale"
    assert all(math.isfinite(log["loss"]) and math.isfinite(log["grad_norm"]) for log in logs)
    assert changed(before, parameters(trainer.model)) > 0
    if overrides["loss_type"] in LOSS_METRICS:
        assert all(LOSS_METRICS[overrides["loss_type"]] in log for log in logs)
    if variants:  # the sequence-level ratio gave another loss than the token-level one would have
        assert differences["token-level"] > 1e-4, differences


# ---- TRL's loss options ----------------------------------------------------------------------------------------

# Each option, the loss type it is trained with, and where it changes the loss's value, the settings without it.
OPTIONS = {
    "mask_truncated_completions": (dict(mask_truncated_completions=True, loss_type="grpo"), None),
    "top_entropy_quantile": (dict(top_entropy_quantile=0.2, loss_type="dapo"), ("all tokens", {})),
    "off_policy_mask_threshold": (
        dict(off_policy_mask_threshold=0.05, loss_type="bnpo"),
        ("unmasked", dict(off_policy_mask_threshold=None)),
    ),
    "delta": (dict(delta=1.5, loss_type="dr_grpo"), ("one-sided clip", dict(delta=None))),
}


def truncated(trainer, inputs) -> torch.Tensor:
    """Per row, whether TRL counts the completion as truncated: it fills max_completion_length and its last token
    is neither end-of-sequence nor padding (trl 1.16.0, `GRPOTrainer._generate`)."""
    ids = inputs["completion_ids"]
    if ids.shape[1] < trainer.max_completion_length:
        return torch.zeros(len(ids), dtype=torch.bool)
    last = ids[:, trainer.max_completion_length - 1]
    return ~torch.isin(last, torch.tensor([*trainer.eos_token_ids, trainer.processing_class.pad_token_id]))


@pytest.mark.parametrize("option", list(OPTIONS))
def test_trl_loss_option_applies_to_stale_and_replayed_rows(option, tiny_model_path, tmp_path):
    """TRL's option acts on BAPO's batch, stale X1 rows and replayed X2/X3 rows included: the loss is TRL's with the
    option, and differs from the loss without it."""
    overrides, variant = OPTIONS[option]
    trainer = build(tiny_model_path, tmp_path, **overrides)
    check = LossCheck(trainer, [variant] if variant else [])
    before = parameters(trainer.model)
    trainer.train()
    differences = check.check()
    logs = bapo_logs(trainer)
    assert check.largest_log_ratio > 0.05 and sum(log["bapo/x3"] for log in logs) > 0
    assert changed(before, parameters(trainer.model)) > 0
    if variant:  # the option changed the loss
        assert differences[variant[0]] > 1e-4, differences
    if option == "top_entropy_quantile":  # TRL chose the high-entropy tokens of every micro-batch
        assert len(check.entropy_masks) == len(check.inputs)
        kept = sum(int(mask.sum()) for mask in check.entropy_masks)
        tokens = sum(int(inputs["completion_mask"].sum()) for _, inputs in check.inputs)
        assert 0 < kept <= 0.3 * tokens, (kept, tokens)
    if option == "mask_truncated_completions":  # truncated rows, fresh or replayed, carry no loss; the others do
        masked_sources = set()
        for _, inputs in check.inputs:
            cut, tokens = truncated(trainer, inputs), inputs["completion_mask"].sum(dim=1)
            assert bool((tokens[cut] == 0).all()) and bool((tokens[~cut] > 0).all())
            masked_sources |= set(inputs["bapo_source"][cut].tolist())
        assert masked_sources >= {1, 2, 3}, masked_sources


# ---- num_iterations --------------------------------------------------------------------------------------------


def test_num_iterations_trains_each_assembled_batch_twice_against_its_behavior_policy(tiny_model_path, tmp_path):
    """mu = 2: every assembled batch is trained on in two optimizer steps; the second takes its ratio against the same
    behavior log-probs, which the first step has moved the policy away from."""
    trainer = build(tiny_model_path, tmp_path, max_steps=6, num_iterations=2)
    check = LossCheck(trainer)
    before = parameters(trainer.model)
    trainer.train()
    check.check()
    logs = bapo_logs(trainer)
    # One rollout step (X1 + X2 + X3) per two optimizer steps: steps 1, 3 and 5 assemble, 2, 4 and 6 reuse.
    assert [log["step"] for log in logs] == [1, 3, 5]
    assert logs[-1]["bapo/rollouts"] < 6 * 16, "a batch was generated for every optimizer step"
    by_step = defaultdict(list)
    for step, inputs in check.inputs:
        by_step[step].append(inputs)
    for step in (2, 4, 6):
        first, second = by_step[step - 1], by_step[step]
        assert [id(inputs) for inputs in second] == [id(inputs) for inputs in first]
        assert all("old_per_token_logps" in inputs for inputs in second)
    # Step 1 trains on-policy (alpha is the policy, the buffers are empty); step 2, on the same rows, off-policy.
    assert check.steps[1]["log_ratio"] < 1e-4 and check.steps[2]["log_ratio"] > 0.01, dict(check.steps)
    assert sum(log["bapo/x2"] for log in logs) > 0 and sum(log["bapo/x3"] for log in logs) > 0
    assert max(log["bapo/policy_lag"] for log in logs) > 0
    assert changed(before, parameters(trainer.model)) > 0


# ---- data preprocessing and the model --------------------------------------------------------------------------


def test_pad_to_multiple_of_holds_for_assembled_batches(tiny_model_path, tmp_path):
    """Every other rollout batch has prompts of 11 characters, padded to 16 columns, the others of 3, padded to 8; X2's
    and X3's rows join batches of the other width. Every micro-batch stays a multiple of 8 wide."""
    plan = {"x" * 8 * (index // 4 % 2) + prompt: ks for index, (prompt, ks) in enumerate(PLAN.items())}
    trainer = build(
        tiny_model_path,
        tmp_path,
        reward_funcs=ScriptedReward(plan),
        dataset=prompt_dataset(list(plan)),
        pad_to_multiple_of=8,
    )
    check, _, logs, before = train_checked(trainer)
    widths = {(inputs["prompt_ids"].shape[1], inputs["completion_ids"].shape[1]) for _, inputs in check.inputs}
    assert all(prompt % 8 == 0 and completion % 8 == 0 for prompt, completion in widths), widths
    assert {prompt for prompt, _ in widths} == {8, 16}, widths
    assert any(len(set(inputs["prompt_mask"].sum(1).tolist())) > 1 for _, inputs in check.inputs), "no mixed batch"
    assert sum(log["bapo/x2"] for log in logs) > 0 and sum(log["bapo/x3"] for log in logs) > 0
    assert changed(before, parameters(trainer.model)) > 0


@pytest.fixture(scope="module")
def untied_model_path(tmp_path_factory) -> str:
    """The tiny model with its own LM head (TRL casts only an untied head to fp32)."""
    tokenizer = build_tokenizer()
    config = text_config(tokenizer, hidden_size=64, layers=2)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    path = tmp_path_factory.mktemp("untied") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_cast_lm_head_to_fp32_swaps_the_fp32_head_with_alpha(untied_model_path, tmp_path):
    """A bf16 model with an fp32 head (ScaleRL): alpha holds the head in fp32 too, and every rollout of a stale step
    generates with alpha's head."""
    trainer = build(
        untied_model_path,
        tmp_path,
        cast_lm_head_to_fp32=True,
        bf16=True,
        learning_rate=1e-2,
        model_init_kwargs={"dtype": "bfloat16"},
    )
    _, weights, logs, before = train_checked(trainer, loss=False)
    dtypes = {name: param.dtype for name, param in trainer.model.named_parameters()}
    assert dtypes.pop("lm_head.weight") == torch.float32 and set(dtypes.values()) == {torch.bfloat16}
    assert trainer._bapo.snapshot.weights["lm_head.weight"].dtype == torch.float32
    assert not torch.equal(before["lm_head.weight"], trainer.model.lm_head.weight)
    assert sum(log["bapo/x2"] for log in logs) > 0 and sum(log["bapo/x3"] for log in logs) > 0
    assert all(math.isfinite(log["loss"]) and math.isfinite(log["grad_norm"]) for log in logs)


# ---- generation ------------------------------------------------------------------------------------------------


def test_transformers_continuous_batching_generates_with_alpha(tiny_model_path, tmp_path):
    """transformers' continuous-batching engine (`generate_batch`) generates every rollout, the fresh one with alpha.
    In fp32: with bf16=True TRL casts the model to bf16 in place before each call, BAPO or not."""
    trainer = build(
        tiny_model_path,
        tmp_path,
        use_transformers_continuous_batching=True,
        transformers_continuous_batching_config={"num_blocks": 16, "page_size": 16, "max_batch_tokens": 256},
    )
    calls = {"generate_batch": 0, "generate": 0}
    for name in calls:
        method = getattr(trainer.model, name)

        def counting(*args, _method=method, _name=name, **kwargs):
            calls[_name] += 1
            return _method(*args, **kwargs)

        setattr(trainer.model, name, counting)
    _, weights, logs, before = train_checked(trainer)
    scoring_calls = sum(len(rollouts) for rollouts in weights.generated.values())
    assert calls == {"generate_batch": scoring_calls, "generate": 0}, calls
    assert sum(log["bapo/x2"] for log in logs) > 0 and sum(log["bapo/x3"] for log in logs) > 0
    assert {param.dtype for param in trainer.model.parameters()} == {torch.float32}
    assert changed(before, parameters(trainer.model)) > 0


# ---- rewards ---------------------------------------------------------------------------------------------------


def test_async_reward_function_is_awaited_for_fresh_rollouts_and_reevaluations(tiny_model_path, tmp_path):
    """An `async def` reward runs on TRL's event loop, for the fresh rollouts and for B_bad's re-evaluations alike, and
    as BAPO's correctness signal (the only reward, its values in [0, 1]) fills both buffers."""
    scripted, awaited = ScriptedReward(PLAN), []

    async def async_accuracy(prompts, completions, **kwargs):
        await asyncio.sleep(0)
        awaited.append((asyncio.get_running_loop(), len(prompts)))
        return scripted(prompts, completions, **kwargs)

    trainer = build(tiny_model_path, tmp_path, reward_funcs=async_accuracy)
    _, weights, logs, before = train_checked(trainer, loss=False)
    scoring_calls = sum(len(rollouts) for rollouts in weights.generated.values())
    assert len(awaited) == scoring_calls > len(logs), "not every fresh rollout and re-evaluation awaited it"
    assert all(loop is trainer.async_loop for loop, _ in awaited)
    assert trainer.bapo_status.correctness.startswith("reward `async_accuracy` >= 1 (the only reward function;")
    assert sum(log["bapo/reevaluated"] for log in logs) > 0 and sum(log["bapo/x2"] for log in logs) > 0
    assert sum(log["bapo/x3"] for log in logs) > 0
    assert all("rewards/async_accuracy/mean" in log for log in logs)
    assert changed(before, parameters(trainer.model)) > 0


def sampled_completions(trainer, prompt_ids: list[list[int]]) -> list[list[int]]:
    """The policy now in the model samples one completion per prompt (prompts of equal length), cut after EOS."""
    tokenizer = trainer.processing_class
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        ids = torch.tensor(prompt_ids)
        output = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            max_new_tokens=trainer.max_completion_length,
            pad_token_id=tokenizer.pad_token_id,
        )
    completions = []
    for row in output[:, ids.shape[1] :].tolist():
        completions.append(row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
    return completions


def test_rollout_func_generates_with_alpha_and_its_fields_reach_the_rewards(tiny_model_path, tmp_path, monkeypatch):
    """A `rollout_func` that samples with the model it is given: the fresh rollout samples alpha, re-evaluation the
    current policy. Its extra field reaches the reward function in both, and its `env_mask` (here: the last token of
    each completion came from an environment) masks the loss of X1's, X2's and X3's rows."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")  # TRL warns that rollout_func is experimental
    scripted, fields_seen = ScriptedReward(PLAN), []

    def rollout_func(prompts, trainer):
        prompt_ids = [trainer.processing_class(prompt)["input_ids"] for prompt in prompts]
        completion_ids = sampled_completions(trainer, prompt_ids)
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": None,
            "task": [f"task {prompt}" for prompt in prompts],  # the same for a prompt's G completions
            "env_mask": [[1] * (len(ids) - 1) + [0] if len(ids) > 1 else [1] for ids in completion_ids],
        }

    def task_reward(prompts, completions, task, **kwargs):
        fields_seen.append(task == [f"task {prompt}" for prompt in prompts])
        return scripted(prompts, completions, **kwargs)

    trainer = build(tiny_model_path, tmp_path, reward_funcs=task_reward, trainer_kwargs={"rollout_func": rollout_func})
    check, weights, _, before = train_checked(trainer)
    assert len(fields_seen) == sum(len(rollouts) for rollouts in weights.generated.values()) and all(fields_seen)
    sources = set()
    for _, inputs in check.inputs:
        lengths = inputs["completion_mask"].sum(dim=1)
        last = inputs["tool_mask"][torch.arange(len(lengths)), lengths - 1]
        assert bool((last[lengths > 1] == 0).all()), "the environment's token carries loss"
        sources |= set(inputs["bapo_source"].tolist())
    assert sources == {1, 2, 3}
    assert changed(before, parameters(trainer.model)) > 0


# ---- tools and environments ------------------------------------------------------------------------------------

# A chat template that renders tool calls and tool results (TRL checks both), prefix-preserving as TRL's multi-turn
# loop needs: "<ai>" opens each assistant turn, "<call>name key=value</call>" is a tool call, "<tool>...</tool>" a
# tool's result. The response template parses a generated turn back into a message with its tool calls.
TOOL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<ai>{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] or [] %}<call>{{ call['function']['name'] }}"
    "{% for key, value in call['function']['arguments'].items() %} {{ key }}={{ value }}{% endfor %}</call>"
    "{% endfor %}<eos>"
    "{% elif message['role'] == 'tool' %}<tool>{{ message['content'] }}</tool>"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<ai>{% endif %}"
)
TOOL_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<ai>",
    "fields": {
        "tool_calls": {
            "open_pattern": r"<call>(?P<name>[a-z]+)",
            "close": "</call>",
            "repeats": True,
            "content": "kv-lines",
            "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}},
        },
        "content": {"close_pattern": r"<eos>\s*", "content": "text"},
    },
}


@pytest.fixture(scope="module")
def tool_model_path(tmp_path_factory) -> str:
    """The tiny model, taught to call the tool `peek` at its first turn and to answer the digit it returns."""
    tokenizer = build_tokenizer(extra_special_tokens=["<ai>", "<call>", "</call>", "<tool>", "</tool>"])
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    tokenizer.response_template = TOOL_RESPONSE_TEMPLATE
    model = build_model(tokenizer)
    pairs = [(f"{prompt}<ai>", "<call>peek</call>") for prompt in PLAN]
    pairs += [(f"{prompt}<ai><call>peek</call><eos><tool>{prompt[0]}</tool><ai>", prompt[0]) for prompt in PLAN]
    warm_start(model, tokenizer, pairs, steps=60, lr=1e-2)
    path = tmp_path_factory.mktemp("tool-model") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def conversational(prompts) -> Dataset:
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": prompt}] for prompt in prompts]})


def user_text(prompts) -> list[str]:
    return [prompt[0]["content"] for prompt in prompts]


def check_tool_turns(check, tokenizer) -> None:
    """Every tool result ("<tool>...</tool>" and the "<ai>" that opens the next turn) carries no loss, in rows of X1,
    X2 and X3 alike: the tool mask travels with replayed rows."""
    opening, closing = tokenizer.convert_tokens_to_ids(["<tool>", "</tool>"])
    sources, turns = set(), 0
    for _, inputs in check.inputs:
        for ids, completion, tools, source in zip(
            inputs["completion_ids"], inputs["completion_mask"], inputs["tool_mask"], inputs["bapo_source"]
        ):
            ids, tools = ids[completion.bool()].tolist(), tools[completion.bool()].tolist()
            for start in [i for i, token in enumerate(ids) if token == opening]:
                end = ids.index(closing, start) + 1
                assert tools[start : end + 1] == [0] * (end + 1 - start), (ids, tools)  # "<ai>" follows "</tool>"
                sources.add(int(source))
                turns += 1
    assert turns > 0 and sources == {1, 2, 3}, (turns, sources)


def test_tools_run_a_multi_turn_rollout_with_alpha_in_every_turn(tool_model_path, tmp_path):
    """GRPOTrainer's `tools`: the model calls `peek`, gets its result and answers, each turn one engine call; every
    turn of a stale step's fresh rollout generates with alpha, every turn of a re-evaluation with the policy."""
    peeks = []

    def peek() -> str:
        """Reads the hidden digit.

        Returns:
            The digit.
        """
        peeks.append(1)
        return "7"

    scripted = ScriptedReward(PLAN)

    def accuracy(prompts, completions, **kwargs):
        return scripted(user_text(prompts), completions, **kwargs)

    trainer = build(
        tool_model_path,
        tmp_path,
        reward_funcs=accuracy,
        dataset=conversational(PLAN),
        max_completion_length=12,
        learning_rate=1e-3,
        trainer_kwargs={"tools": [peek]},
    )
    check, weights, logs, before = train_checked(trainer)
    # Several turns per scoring call: the first, and one after each tool result.
    assert all(len(calls) > 1 for rollouts in weights.generated.values() for calls in rollouts)
    assert len(peeks) > 0 and all(log["tools/call_frequency"] > 0.5 for log in logs)
    assert all(log["tools/failure_frequency"] < 0.5 for log in logs)
    check_tool_turns(check, trainer.processing_class)
    assert changed(before, parameters(trainer.model)) > 0


class Vault:
    """An environment whose task comes from the dataset row: `reset` hides the digit the prompt starts with, the tool
    `peek` reads it, and the environment's own reward says whether it was read. Records every reset."""

    resets: list[str] = []

    def reset(self, prompt, **kwargs):
        self.secret, self.peeks = prompt[0]["content"][0], 0
        Vault.resets.append(prompt[0]["content"])

    def peek(self) -> str:
        """Reads the hidden digit.

        Returns:
            The digit.
        """
        self.peeks += 1
        return self.secret

    def get_reward(self) -> float:
        return float(self.peeks > 0)


def test_environment_factory_resets_from_the_stored_row_for_reevaluation(tool_model_path, tmp_path):
    """One environment per rollout: fresh rollouts and B_bad's re-evaluations reset it from the dataset row (the one
    B_bad stored), its method is the tool, and its own reward is scored beside the accuracy, which stays BAPO's
    correctness signal."""
    Vault.resets = []
    scripted, scored = ScriptedReward(PLAN), []

    def accuracy(prompts, completions, environments, **kwargs):
        scored.append([(environment.secret, prompt) for environment, prompt in zip(environments, user_text(prompts))])
        return scripted(user_text(prompts), completions, **kwargs)

    trainer = build(
        tool_model_path,
        tmp_path,
        reward_funcs=accuracy,
        dataset=conversational(PLAN),
        max_completion_length=12,
        learning_rate=1e-3,
        correctness_reward="accuracy",
        trainer_kwargs={"environment_factory": Vault},
    )
    check, _, logs, before = train_checked(trainer)
    # Every scoring call reset one environment per completion, from the row being scored: a re-evaluation (fewer
    # than 16 completions) from the rows B_bad stored, the "a" prompts no completion solved at first.
    assert all(secret == prompt[0] for call in scored for secret, prompt in call)
    assert Vault.resets == [prompt for call in scored for _, prompt in call]
    reevaluated = [prompt for call in scored if len(call) < 16 for _, prompt in call]
    assert reevaluated and all(prompt.endswith("a=") for prompt in reevaluated), reevaluated
    assert sum(log["bapo/x2"] for log in logs) > 0
    assert all(log["rewards/Vault/mean"] > 0.5 and log["tools/call_frequency"] > 0.5 for log in logs)
    assert trainer.bapo_status.correctness.startswith("reward `accuracy`")
    check_tool_turns(check, trainer.processing_class)
    assert changed(before, parameters(trainer.model)) > 0


# ---- rollout_func: per-completion extra fields ----------------------------------------------------------------


def per_completion_rollout_func(prompts, trainer):
    """A rollout_func whose extra field differs per completion: the completion's own text, as an environment's
    feedback would."""
    prompt_ids = [trainer.processing_class(prompt)["input_ids"] for prompt in prompts]
    completion_ids = sampled_completions(trainer, prompt_ids)
    texts = trainer.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None, "sample": texts}


def test_rollout_func_per_completion_fields_reach_reevaluation_rewards(tiny_model_path, tmp_path):
    scripted, mismatches = ScriptedReward(PLAN), []

    def reward(prompts, completions, sample, **kwargs):
        mismatches.append(sum(text != completion for text, completion in zip(sample, completions)))
        return scripted(prompts, completions, **kwargs)

    trainer = build(
        tiny_model_path, tmp_path, reward_funcs=reward, trainer_kwargs={"rollout_func": per_completion_rollout_func}
    )
    trainer.train()
    assert len(mismatches) > 4, "no re-evaluation"
    assert mismatches == [0] * len(mismatches), mismatches  # on 26ed522: [0, 0, 6, 0, 0, 6]


def test_rollout_func_fields_leave_a_prompt_one_entry_in_the_difficult_buffer(tiny_model_path, tmp_path):
    plan = {"a=": [0], "b=": [2], "c=": [1], "d=": [3]}  # "a=" stays unsolved, met again at every step
    trainer = build(
        tiny_model_path,
        tmp_path,
        reward_funcs=ScriptedReward(plan),
        dataset=prompt_dataset(list(plan)),
        max_steps=6,
        reevaluation_interval=3,
        use_high_quality_replay=False,
        trainer_kwargs={"rollout_func": per_completion_rollout_func},
    )
    trainer.train()
    entries = [group.prompt for group in trainer._bapo.buffers.difficult_entries()]
    assert entries == ["a="], entries  # on 26ed522: ["a=", "a=", "a=", "a="]
    assert all(log["bapo/difficult_buffer"] == 1 for log in bapo_logs(trainer))


def test_liger_kernel_is_refused_with_the_reason(tmp_path):
    """Liger needs triton (a GPU) and TRL 1.16 deprecates the flag; nothing here ran it with the delayed policy."""
    with pytest.raises(ValueError, match="use_liger_kernel=True is not supported by BAPOTrainer"):
        make_config(tmp_path, use_liger_kernel=True)
