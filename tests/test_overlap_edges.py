"""Where per-step seeds and the overlapped rollout could silently differ from what the user asked for: a background
call that syncs the weights being trained to the vLLM server, sampling settings the per-step sampler drops, prompt
tracking that draws other samples at each measurement, a read-ahead that keeps every batch, a patched forward found
only mid-run. Each through `train()` or the constructor, on the tiny model."""

import hashlib
import threading
from types import SimpleNamespace

import pytest
import torch
from conftest import make_config, prompt_dataset
from test_overlap import PROMPTS, LengthParity, assert_same_run
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import GRPOTrainer

from trl_bapo import BAPOTrainer
from trl_bapo.tracking import TRACKING_FILE, read_records


def fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode() + param.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


class FakeServer:
    """Stands in for `trainer.vllm_generation` in TRL's server mode, which needs a vLLM server this venv cannot run:
    `sync_weights` takes the policy's weights as they are now, as TRL's sends them, and `generate` samples from a
    function of the weights the server holds, the request's seed and the prompt. The shallow copies BAPO makes of the
    handle (for a request's own seed) talk to the same server."""

    mode, enable_sleep_mode = "server", False

    def __init__(self, model: torch.nn.Module, vocab: int):
        self.model, self.vocab, self.generation_kwargs = model, vocab, {}
        self.server = SimpleNamespace(held=None, received=[], generated_with=[])

    def sync_weights(self):
        self.server.held = fingerprint(self.model)
        self.server.received.append(self.server.held)

    def generate(self, prompts, images, num_generations, profiler):
        held, seed = self.server.held, self.generation_kwargs["seed"]
        self.server.generated_with.append(held)
        completions = []
        for i, prompt in enumerate(prompts):
            key = hashlib.sha256(f"{held}/{seed}/{i}/{prompt}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(key[:7], "little"))
            length = int(torch.randint(1, 5, (1,), generator=generator))
            completions.append(torch.randint(2, self.vocab, (length,), generator=generator).tolist())
        return prompts, completions, [[[-1.0]] * len(completion) for completion in completions], None


def train_on_fake_server(model, out, overlap: bool, monkeypatch) -> tuple[BAPOTrainer, LengthParity, FakeServer]:
    """A run whose engine is the fake server, where every background call waits until the optimizer step it overlaps
    has ended: the order in which TRL's engine call would see a moved `global_step`."""
    reward = LengthParity()
    args = make_config(out, rollout_delay=3, max_steps=8, rollout_sampling_seed="per_step", overlap_rollout=overlap)
    trainer = BAPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=prompt_dataset(PROMPTS))
    server = FakeServer(trainer.model, len(trainer.processing_class))
    trainer.use_vllm, trainer.vllm_generation, trainer._last_loaded_step = True, server, -1

    step_ended, waits = threading.Event(), []
    start = trainer._engine_calls.start

    def start_after_clearing(generation_batch, t):
        step_ended.clear()  # before the prefetch is submitted; set again once this rollout step's update ends
        start(generation_batch, t)

    class StepEnded(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ended.set()

    trl_call = GRPOTrainer._generate_single_turn

    def engine_call_after_the_step(self, *inputs, **named):
        if threading.current_thread().name.startswith("bapo-prefetch"):
            waits.append(step_ended.wait(timeout=120))
        return trl_call(self, *inputs, **named)

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", engine_call_after_the_step)
    trainer._engine_calls.start = start_after_clearing
    trainer.add_callback(StepEnded())
    trainer.train()
    assert all(waits) and bool(waits) == overlap
    return trainer, reward, server


def test_a_background_call_on_the_vllm_server_generates_with_alpha(tiny_model_path, tmp_path, monkeypatch):
    """TRL's engine call (trl 1.16.0, `_generate_single_turn`) sends the weights in training to the server when the
    trainer's global step moved since `_last_loaded_step`. A background call whose optimizer step ended before it
    reached that check must not: the server gets exactly the weights the synchronous run sends (alpha), and generates
    every rollout with the weights the synchronous run's server held. Stands on TRL's real vLLM branch of the engine
    call and BAPO's real `EngineWeights`; the server is `FakeServer`."""
    sync = train_on_fake_server(tiny_model_path, tmp_path / "sync", False, monkeypatch)
    overlapped = train_on_fake_server(tiny_model_path, tmp_path / "overlap", True, monkeypatch)
    assert overlapped[2].server.received == sync[2].server.received
    assert overlapped[2].server.generated_with == sync[2].server.generated_with
    assert_same_run(sync[:2], overlapped[:2])


def per_step_trainer(tmp_path, tiny_model_path, **overrides) -> BAPOTrainer:
    # rollout_delay=1 without X3: the config's own refusal of truncated sampling (behavior log-probs) stays out.
    settings = dict(rollout_delay=1, use_high_quality_replay=False, rollout_sampling_seed="per_step")
    args = make_config(tmp_path, **{**settings, **overrides})
    return BAPOTrainer(
        model=tiny_model_path, reward_funcs=LengthParity(), args=args, train_dataset=prompt_dataset(PROMPTS)
    )


@pytest.mark.parametrize(
    ("generation_kwargs", "message"),
    [
        ({"typical_p": 0.9}, r"generation_kwargs\['typical_p'\]=0.9 is not applied"),
        ({"epsilon_cutoff": 0.05}, r"generation_kwargs\['epsilon_cutoff'\]=0.05 is not applied"),
        ({"eta_cutoff": 0.05}, r"generation_kwargs\['eta_cutoff'\]=0.05 is not applied"),
        ({"top_h": 0.5}, r"generation_kwargs\['top_h'\]=0.5 is not applied"),
        ({"do_sample": False}, r"generation_kwargs\['do_sample'\]=False makes .* decode by greedy_search"),
        ({"num_beams": 2}, r"generation_kwargs\['num_beams'\]=2 makes .* decode by beam_sample"),
    ],
)
def test_per_step_seeds_refuse_sampling_settings_their_sampler_drops(
    generation_kwargs, message, tiny_model_path, tmp_path
):
    with pytest.raises(ValueError, match=message):
        per_step_trainer(tmp_path, tiny_model_path, generation_kwargs=generation_kwargs)


@pytest.mark.parametrize(
    "settings",
    [
        # Logits processors transformers' generate applies before the per-step sampler draws.
        dict(repetition_penalty=1.3, generation_kwargs={"no_repeat_ngram_size": 2, "suppress_tokens": [5]}),
        dict(rollout_sampling_seed="global", generation_kwargs={"typical_p": 0.9, "do_sample": False}),
    ],
)
def test_sampling_settings_that_are_applied_are_accepted(settings, tiny_model_path, tmp_path):
    per_step_trainer(tmp_path, tiny_model_path, **settings)


def digit_reward(prompts, completions, **kwargs):
    return [float(any(ch.isdigit() for ch in completion)) for completion in completions]


@pytest.mark.parametrize("seed_mode", ["per_step", "global"])
def test_prompt_tracking_makes_the_same_draw_at_every_measurement(seed_mode, tiny_model_path, tmp_path):
    """Weights that do not change (learning_rate=0) measure the same accuracies at every evaluation."""
    args = make_config(
        tmp_path,
        max_steps=3,
        learning_rate=0.0,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=8,
        track_prompts=True,
        rollout_sampling_seed=seed_mode,
    )
    held_out = [f"{i}z=" for i in range(8)]
    trainer = BAPOTrainer(
        model=tiny_model_path,
        reward_funcs=digit_reward,
        args=args,
        train_dataset=prompt_dataset(PROMPTS),
        eval_dataset=prompt_dataset(held_out),
    )
    trainer.train()
    records = read_records(str(tmp_path / TRACKING_FILE))
    assert [record["step"] for record in records] == [0, 1, 2, 3]
    baseline = records[0]["accuracy"]
    assert 0 < sum(baseline) < len(baseline), "a measurement every prompt passes or fails cannot show the draw"
    assert [record["accuracy"] for record in records] == [baseline] * len(records)


def test_the_read_ahead_keeps_only_what_a_prefetch_can_ask_for(tiny_model_path, tmp_path):
    """An epoch of 16 rollout steps: the read-ahead holds the current rollout step's batches and the next one's first,
    not every batch given out since the epoch began."""
    args = make_config(tmp_path, rollout_delay=3, max_steps=8, rollout_sampling_seed="per_step", overlap_rollout=True)
    prompts = [f"{a}+{b}=" for a in range(8) for b in range(8)]
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=LengthParity(), args=args, train_dataset=prompt_dataset(prompts)
    )
    kept = []

    class Kept(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            kept.append(trainer._engine_calls.read_ahead.kept)

    trainer.add_callback(Kept())
    trainer.train()
    assert sum(entry.get("bapo/prefetched", 0) for entry in trainer.state.log_history) >= 2
    micro_steps = args.steps_per_generation * trainer.num_iterations
    assert len(kept) == 8 and max(kept) <= micro_steps + 1, kept


def test_a_patched_forward_is_refused_at_construction(tiny_model_path, tmp_path):
    """The replica of alpha would run a closure over the live policy's module; refused before training starts."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    mlp = model.model.layers[0].mlp
    mlp.forward = lambda hidden: type(mlp).forward(mlp, hidden)  # as kernel patches do: a closure over `mlp`
    args = make_config(tmp_path, rollout_delay=3, rollout_sampling_seed="per_step", overlap_rollout=True)
    with pytest.raises(ValueError, match=r"the forward of model\.layers\.0\.mlp is patched"):
        BAPOTrainer(model=model, reward_funcs=LengthParity(), args=args, train_dataset=prompt_dataset(PROMPTS))


def model_with_generation_config(tiny_model_path, tmp_path, **settings) -> str:
    """The tiny model with sampling settings in its own generation_config.json, as some hub models ship them."""
    import json
    import shutil

    path = tmp_path / "model-with-generation-config"
    shutil.copytree(tiny_model_path, path)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, **settings}))
    return str(path)


class DistinctCompletions:
    """A 0/1 reward that records how many distinct completions each group of G had."""

    __name__ = "distinct_completions"

    def __init__(self):
        self.per_group = []

    def __call__(self, completions, **kwargs):
        for start in range(0, len(completions), 4):
            self.per_group.append(len(set(completions[start : start + 4])))
        return [float(len(completion) % 2) for completion in completions]


def test_sampling_settings_from_the_models_own_generation_config_are_applied_or_refused(tiny_model_path, tmp_path):
    """Found by review: transformers fills what TRL leaves unset (min_p, typical_p) from the model's
    generation_config.json. With the default delay its truncation was never refused, and under per-step seeds the
    step sampler dropped it silently (4 distinct completions of 4 where the global seed gave 1)."""
    narrow = model_with_generation_config(tiny_model_path, tmp_path, min_p=0.95)
    dataset = prompt_dataset(PROMPTS)
    with pytest.raises(ValueError, match=r"model's generation_config sets min_p=0.95, .*delayed or replayed"):
        BAPOTrainer(narrow, DistinctCompletions(), make_config(tmp_path / "stale"), train_dataset=dataset)
    fresh = dict(rollout_delay=1, use_high_quality_replay=False, max_steps=2)
    for seeds in ("global", "per_step"):
        reward = DistinctCompletions()
        args = make_config(tmp_path / seeds, rollout_sampling_seed=seeds, **fresh)
        BAPOTrainer(narrow, reward, args, train_dataset=dataset).train()
        assert set(reward.per_group) == {1}, (seeds, reward.per_group)  # min_p=0.95 leaves one token to sample
    typical = model_with_generation_config(tiny_model_path, tmp_path / "typical", typical_p=0.2)
    args = make_config(tmp_path / "typical-run", rollout_sampling_seed="per_step", **fresh)
    with pytest.raises(ValueError, match=r"the model generation_config.json\['typical_p'\]=0.2 is not applied"):
        BAPOTrainer(typical, DistinctCompletions(), args, train_dataset=dataset)
