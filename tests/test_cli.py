"""`trl-bapo`: every recipe parses into the paper's settings, a `trl grpo` YAML runs unchanged with BAPO's fields
added, and the demo recipe trains through the script."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import datasets.config
import pytest
import transformers.training_args
import yaml
from datasets import IterableDataset
from trl import DatasetMixtureConfig, ModelConfig
from trl.scripts.grpo import make_parser as trl_grpo_parser

from trl_bapo import BAPOConfig, cli
from trl_bapo.builtin.embedded import TRAINING, embedded_model
from trl_bapo.builtin.rewards import load_reward
from trl_bapo.cli import launch_arguments
from trl_bapo.scripts.bapo import BAPOScriptArguments, main, make_parser, resolve_model
from trl_bapo.scripts.data import load_prompts

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEMO = RECIPES / "demo.yaml"
GPU_COUNT = 8  # the GPU recipes' batch sizes are written for 8 GPUs


AUTHORS = RECIPES / "bapo_authors.yaml"  # the authors' code's settings, not Table 3's


def recipe_paths() -> list[Path]:
    return sorted(RECIPES.glob("*.yaml"))


def paper_recipe_paths() -> list[Path]:
    return [path for path in recipe_paths() if path != AUTHORS]


@pytest.fixture
def bf16_gpu(monkeypatch):
    # The GPU recipes set bf16, which TrainingArguments refuses on a machine without a bf16 GPU; parse them as a
    # GPU machine would.
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)


@pytest.fixture
def local_dataset(tmp_path, monkeypatch):
    """Writes a one-row local dataset and returns its path; `datasets` caches it under tmp_path, not ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")

    def write(row: dict) -> str:
        folder = tmp_path / "my_dataset"
        folder.mkdir()
        (folder / "train.jsonl").write_text(json.dumps(row) + "\n")
        return str(folder)

    return write


def parse(recipe: Path, *overrides: str):
    return make_parser().parse_args_and_config(["--config", str(recipe), *overrides])


def test_help_lists_every_bapo_field(capsys):
    """argparse formats each field's help with %: a stray percent sign once broke `trl-bapo --help`."""
    with pytest.raises(SystemExit) as exited:
        make_parser().parse_args_and_config(["--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    for name in BAPOConfig.__dataclass_fields__:
        assert f"--{name}" in shown, name


def test_recipes_exist():
    assert {path.name for path in recipe_paths()} >= {
        "demo.yaml",
        "math_deepscaler.yaml",
        "countdown.yaml",
        "geometry3k.yaml",
    }


@pytest.mark.parametrize("recipe", paper_recipe_paths(), ids=lambda path: path.name)
def test_recipe_parses_into_paper_settings(recipe, bf16_gpu):
    script_args, config, model_args, _ = parse(recipe)
    assert isinstance(script_args, BAPOScriptArguments)
    assert isinstance(config, BAPOConfig)
    assert isinstance(model_args, ModelConfig)
    assert script_args.reward_funcs and script_args.dataset_name and model_args.model_name_or_path

    # BAPO at Table 3's values
    assert config.num_generations == 8
    assert config.rollout_delay == 5
    assert config.reevaluation_interval == 5
    assert config.max_reevaluation_prompts == 128
    assert config.difficult_threshold == 0.125
    assert config.high_quality_lower_range == [0.125, 0.5]
    assert config.high_quality_upper_range == [0.25, 0.625]
    assert config.online_filter == "range"
    assert config.online_filter_gaussian_mean == 0.5
    assert config.online_filter_gaussian_std == 0.2
    assert config.kl_reference == "behavior"
    assert config.beta == 0.001
    assert config.temperature == 1.0
    assert not config.use_vllm

    assert_every_key_arrives(recipe, script_args, config, model_args)


def assert_every_key_arrives(recipe: Path, *parsed_args) -> None:
    """Every key the recipe sets reaches a dataclass unchanged (no typo silently ignored, no YAML "1e-6" string)."""
    for key, value in yaml.safe_load(recipe.read_text()).items():
        owner = next(args for args in parsed_args if hasattr(args, key))
        parsed = getattr(owner, key)
        if key != "report_to":  # TrainingArguments turns "none" into []
            assert parsed == value or str(parsed) == str(value), key


def test_authors_recipe_has_their_run_script_settings(bf16_gpu):
    """my_scripts/run_qwen3-8b_dapo_math_off.sh of github.com/waunx/BAPO_ICLR, on 8 GPUs."""
    script_args, config, model_args, _ = parse(AUTHORS)
    assert config.generation_batch_size // config.num_generations == 32
    mini_batch = config.per_device_train_batch_size * GPU_COUNT * config.gradient_accumulation_steps
    assert mini_batch // config.num_generations == 16  # 2 updates per rollout
    assert (config.rollout_delay, config.reevaluation_interval, config.max_reevaluation_prompts) == (2, 2, 32)
    assert (config.reevaluation_order, config.difficult_admission) == ("random", "improved_or_solved")
    assert config.keep_reevaluated_prompts and config.cap_difficult_replay and config.online_filter_fallback
    assert config.rollout_refresh_phase == 1 and config.difficult_entry_after_update
    assert config.shared_buffer and (config.difficult_buffer_size, config.high_quality_buffer_size) == (128, 8)
    assert config.high_quality_lower_range == [0.125, 0.125] and config.high_quality_upper_range == [0.375, 0.375]
    assert (config.off_policy_correction, config.importance_sampling_cap) == ("decoupled", 3.0)
    assert (config.x3_anchor, config.batch_aggregation) == ("stored", "mini_batch")
    assert not config.vllm_importance_sampling_correction  # one truncation of the importance weight, not two
    assert (config.epsilon, config.epsilon_high, config.delta) == (0.2, 0.28, 10.0)
    assert (config.beta, config.entropy_coef, config.weight_decay, config.temperature) == (0.0, 0.0, 0.1, 0.99)
    # verl steps its scheduler once per rollout step (10 warm-up steps), TRL once per optimizer step (2 a rollout).
    assert (config.lr_scheduler_type, config.warmup_steps) == ("constant_with_warmup", 20)
    assert_every_key_arrives(AUTHORS, script_args, config, model_args)


@pytest.mark.parametrize("name", ["math_deepscaler.yaml", "countdown.yaml", "geometry3k.yaml"])
def test_gpu_recipes_use_table_3_batches(name, bf16_gpu):
    script_args, config, model_args, _ = parse(RECIPES / name)
    prompts_per_rollout = config.generation_batch_size // config.num_generations
    mini_batch = config.per_device_train_batch_size * GPU_COUNT * config.gradient_accumulation_steps
    assert prompts_per_rollout == 256
    assert mini_batch // config.num_generations == 64
    assert config.generation_batch_size % (config.per_device_train_batch_size * GPU_COUNT) == 0
    assert config.learning_rate == 1e-6
    assert config.top_p == 1.0
    assert config.entropy_coef == 0.001
    assert config.bf16 and config.gradient_checkpointing
    assert model_args.dtype == "bfloat16"
    expected = {"math_deepscaler.yaml": (8192, 3), "countdown.yaml": (1024, 3), "geometry3k.yaml": (2048, 30)}
    assert (config.max_completion_length, config.num_train_epochs) == expected[name]


def test_demo_recipe_matches_the_demo():
    script_args, config, model_args, _ = parse(DEMO)
    assert model_args.model_name_or_path == "embedded"
    assert script_args.dataset_name == "embedded-carry"
    assert script_args.reward_funcs == ["carry"]
    assert config.use_cpu
    assert config.generation_batch_size // config.num_generations == 16
    assert config.max_steps == 300
    # The recipe trains what `make demo` trains: every shared setting equals the embedded default's.
    for key, value in TRAINING.items():
        if key not in {"report_to", "disable_tqdm"}:
            assert getattr(config, key) == value, key


@pytest.mark.parametrize("recipe", recipe_paths(), ids=lambda path: path.name)
def test_recipe_header_has_a_command(recipe):
    header = recipe.read_text().split("\n\n", 1)[0]
    assert f"--config recipes/{recipe.name}" in header


def test_accelerate_settings_go_to_accelerate_as_trl_grpo_sends_them():
    launch, script = launch_arguments(
        ["--config", str(DEMO), "--accelerate_config", "zero3", "--num_processes", "2", "--max_steps", "3"]
    )
    assert launch == [
        "--config_file",
        str(resources.files("trl.accelerate_configs") / "zero3.yaml"),
        "--num_processes",
        "2",
    ]
    assert script == ["--config", str(DEMO), "--max_steps", "3"]


def test_demo_recipe_trains_through_the_cli(tiny_model_path, tmp_path):
    trainer = main(
        [
            "--config",
            str(DEMO),
            "--model_name_or_path",
            tiny_model_path,
            "--dataset_name",
            "embedded-carry",
            "--max_steps",
            "2",
            "--output_dir",
            str(tmp_path),
            "--disable_tqdm",
            "true",
        ]
    )
    assert trainer.state.global_step == 2
    assert any("bapo/x1" in entry for entry in trainer.state.log_history)
    assert (tmp_path / "config.json").exists()  # the trained model was saved


def test_demo_recipe_evaluates_during_training(tmp_path):
    """The command of docs/scaling.md's evaluation example: the embedded model, evaluated on the held-out split."""
    trainer = main(
        [
            "--config",
            str(DEMO),
            "--max_steps",
            "2",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "1",
            "--dataset_test_split",
            "test",
            "--output_dir",
            str(tmp_path),
            "--disable_tqdm",
            "true",
        ]
    )
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [1, 2]
    assert all(0 <= entry["eval_reward"] <= 1 for entry in evaluations)


def test_unknown_reward_fails_clearly():
    with pytest.raises(ValueError, match=r"unknown reward function 'nope'.*accuracy_reward.*arithmetic.*countdown"):
        main(["--config", str(DEMO), "--reward_funcs", "nope"])


def test_missing_reward_fails_clearly(tmp_path):
    settings = yaml.safe_load(DEMO.read_text())
    del settings["reward_funcs"]
    recipe = tmp_path / "no_reward.yaml"
    recipe.write_text(yaml.safe_dump(settings))
    with pytest.raises(ValueError, match=r"reward_funcs \(or reward_model_name_or_path\) is required"):
        main(["--config", str(recipe)])


def test_unknown_dataset_fails_clearly(local_dataset, tiny_model_path):
    data = local_dataset({"question": "1+1=", "answer": "2"})
    with pytest.raises(ValueError, match="no 'prompt' column") as error:
        main(["--config", str(DEMO), "--dataset_name", data, "--model_name_or_path", tiny_model_path])
    for supported in ("DeepScaleR-Preview-Dataset", "Countdown-Tasks-3to4", "geometry3k", "embedded-arithmetic"):
        assert supported in str(error.value)


def test_dataset_with_prompt_column_loads_as_is(local_dataset):
    script_args = BAPOScriptArguments(dataset_name=local_dataset({"prompt": "1+1=", "answer": "2"}))
    dataset = load_prompts(script_args, "train")
    assert dataset[0] == {"prompt": "1+1=", "answer": "2"}


def test_embedded_model_is_warm_started_on_the_embedded_task_or_on_carry():
    embedded = ModelConfig(model_name_or_path="embedded")
    assert resolve_model(embedded, BAPOScriptArguments(dataset_name="some/dataset")) == str(embedded_model("carry"))
    with pytest.raises(ValueError, match="for a chat model: use model_name_or_path 'smollm2'"):
        resolve_model(embedded, BAPOScriptArguments(dataset_name="embedded-word-problems"))


def test_task_rewards_read_chat_completions_and_answer_tags():
    countdown = load_reward("countdown")
    completions = [
        [{"role": "assistant", "content": "3 * 4 = 12, then 12 + 5.\n<answer>(3 * 4) + 5</answer>"}],
        [{"role": "assistant", "content": "<answer>3 + 4 + 5</answer>"}],
        "(3*4)+5",  # the embedded tiny model writes bare answers
    ]
    assert countdown(completions, numbers=[[3, 4, 5]] * 3, target=[17] * 3) == [1.0, 0.0, 1.0]
    assert countdown.__name__ == "countdown_reward"  # TRL logs rewards under the function's name
    assert load_reward("arithmetic")([[{"role": "assistant", "content": " 12"}]], answer=["12"]) == [1.0]


def test_trl_rewards_load_by_trl_grpo_names():
    assert load_reward("accuracy_reward").__name__ == "accuracy_reward"
    assert load_reward("think_format_reward").__name__ == "think_format_reward"
    assert load_reward("reasoning_accuracy_reward").__name__ == "reasoning_accuracy_reward"
    punish = load_reward("get_soft_overlong_punishment")
    assert punish(completion_ids=[[1] * 1024, [1] * 1280]) == [0.0, -1.0]  # max 1280 tokens, 256 of cache


def test_dotted_reward_path_imports_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def shortest(completions, **kwargs):\n    return [0.0] * len(completions)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert load_reward("my_rewards.shortest")(["a", "b"]) == [0.0, 0.0]


def test_streamed_dataset_trains(tmp_path):
    trainer = main(
        [
            "--config",
            str(DEMO),
            "--dataset_streaming",
            "true",
            "--max_steps",
            "2",
            "--output_dir",
            str(tmp_path),
            "--disable_tqdm",
            "true",
        ]
    )
    assert isinstance(trainer.train_dataset, IterableDataset)
    assert trainer.state.global_step == 2
    assert sum(entry.get("bapo/x1", 0) for entry in trainer.state.log_history) > 0


def write_trl_grpo_config(tmp_path: Path) -> dict:
    """A `trl grpo` user's config: a `datasets:` mixture of a local conversational dataset, scored by TRL's
    accuracy_reward, by the user's own reward in a module of the current directory, and by a reward model."""
    rows = [
        {"prompt": [{"role": "user", "content": f"{a}+{b}="}], "solution": f"${a + b}$", "answer": str(a + b)}
        for a in range(10, 90, 7)
        for b in range(10)
    ]
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "my_rewards.py").write_text(
        "def exact(completions, answer, **kwargs):\n"
        "    return [float(c[0]['content'].strip() == a) for c, a in zip(completions, answer)]\n"
    )
    return {
        "model_name_or_path": "embedded",
        "datasets": [{"path": "json", "data_files": str(data), "split": "train"}],
        "test_split_size": 0.1,
        "reward_funcs": ["accuracy_reward", "my_rewards.exact"],
        "reward_model_name_or_path": str(embedded_model("carry")),
        "num_generations": 4,
        "per_device_train_batch_size": 16,
        "max_completion_length": 6,
        "max_steps": 2,
        "logging_steps": 1,
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "save_strategy": "steps",
        "save_steps": 2,
        "output_dir": str(tmp_path / "out"),
    }


def test_trl_grpo_config_runs_unchanged_with_bapo_fields_added(tmp_path):
    grpo_settings = write_trl_grpo_config(tmp_path)
    grpo_yaml = tmp_path / "grpo.yaml"
    grpo_yaml.write_text(yaml.safe_dump(grpo_settings))
    *_, mixture = trl_grpo_parser().parse_args_and_config(["--config", str(grpo_yaml)])
    assert isinstance(mixture, DatasetMixtureConfig) and mixture.datasets  # a valid `trl grpo` config

    bapo_yaml = tmp_path / "bapo.yaml"
    bapo_settings = dict(grpo_settings, rollout_delay=2, reevaluation_interval=1, correctness_reward="exact")
    bapo_yaml.write_text(yaml.safe_dump(bapo_settings))
    run = subprocess.run(
        [str(Path(sys.executable).parent / "trl-bapo"), "--config", str(bapo_yaml), "--num_processes", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # where the user's reward module is
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    history = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "bapo/x1" in entry]
    assert [entry["step"] for entry in steps] == [1, 2]
    assert sum(entry["bapo/x1"] for entry in steps) > 0  # the user's reward decided correctness: groups trained
    # Every reward scored the completions: TRL logs each under its name, the reward model under its folder's.
    model_reward = f"rewards/{embedded_model('carry').name}/mean"
    for name in ("rewards/accuracy_reward/mean", "rewards/exact/mean", model_reward):
        assert all(name in entry for entry in steps), name


def test_a_refusal_through_trl_bapo_ends_with_its_message_and_the_childs_exit_code(tmp_path):
    """The training process refuses an output_dir inside a file; the launcher adds nothing after its message."""
    (tmp_path / "a_file").write_text("")
    output_dir = tmp_path / "a_file" / "out"
    command = [str(Path(sys.executable).parent / "trl-bapo"), "--config", str(DEMO), "--num_processes", "1"]
    run = subprocess.run([*command, "--output_dir", str(output_dir)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stdout + run.stderr, run.stderr[-3000:]
    assert run.stderr.splitlines()[-1] == (
        f"ValueError: output_dir '{output_dir}' is not writable (NotADirectoryError: Not a directory): checkpoints "
        "and the final model would fail to save after training. Choose a writable output_dir."
    )


def test_a_refusal_is_its_message_and_any_other_error_keeps_its_traceback(tmp_path, monkeypatch):
    """In the launching process (settings refused while the arguments are split) and in a training process (as
    accelerate starts it): trl-bapo's refusals end as their message; a user's module that fails raises as it is."""
    with pytest.raises(SystemExit) as refused:
        cli.main(["--config", str(DEMO), "--difficult_threshold", "0.25"])
    assert str(refused.value).startswith("ValueError: difficult_threshold (c1) = 0.25 lies above the lower edge")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # as in a process `accelerate launch` started
    with pytest.raises(SystemExit) as refused:
        cli.main(["--config", str(DEMO), "--reward_funcs", "nope"])
    assert str(refused.value).startswith("ValueError: unknown reward function 'nope'")
    (tmp_path / "broken_rewards.py").write_text("raise ValueError('a bug in the reward module')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(ValueError, match="a bug in the reward module"):
        cli.main(["--config", str(DEMO), "--reward_funcs", "broken_rewards.reward"])


@pytest.mark.parametrize(
    ("ending", "status", "last_line"),
    [
        ("import sys; sys.exit(3)", 3, None),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 137, "killed by SIGKILL"),
    ],
)
def test_trl_bapo_exits_with_the_training_process_status(ending, status, last_line, tmp_path, monkeypatch, capfd):
    """A training process that exits with its own status, or is killed as the OOM killer kills it: `trl-bapo`
    exits with that status, as a shell reports it, without the launcher's traceback."""
    (tmp_path / "ending.py").write_text(ending + "\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(cli, "SCRIPT", "ending")
    assert cli.main(["--config", str(DEMO), "--num_processes", "1"]) == status
    printed = capfd.readouterr()
    assert "Traceback" not in printed.out + printed.err
    if last_line:
        assert printed.err.splitlines()[-1] == f"trl-bapo: the training process was {last_line}"
