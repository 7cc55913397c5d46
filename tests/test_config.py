"""BAPOConfig: defaults from Table 3, documented fields, and clear errors for every invalid value."""

import dataclasses
import warnings

import pytest
from trl import GRPOConfig

from trl_bapo import BAPOConfig, BAPOTrainer
from trl_bapo.builtin.tasks import exact_answer_reward
from trl_bapo.config import HEADINGS, THRESHOLD_FIELDS

BAPO_FIELDS = [
    f for f in dataclasses.fields(BAPOConfig) if f.name not in {g.name for g in dataclasses.fields(GRPOConfig)}
]


def _config(tmp_path, **kwargs):
    settings = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], num_generations=8, per_device_train_batch_size=8
    )
    return BAPOConfig(**{**settings, **kwargs})


def test_defaults_are_table_3(tmp_path):
    config = _config(tmp_path)
    assert (config.rollout_delay, config.reevaluation_interval, config.max_reevaluation_prompts) == (5, 5, 128)
    assert config.difficult_threshold == 1 / 8
    assert config.high_quality_lower_range == [1 / 8, 4 / 8] and config.high_quality_upper_range == [2 / 8, 5 / 8]
    assert config.high_quality_buffer_steps == 3
    assert (config.online_filter, config.online_filter_gaussian_mean, config.online_filter_gaussian_std) == (
        "range",
        0.5,
        0.2,
    )
    assert config.online_filter_uniform_keep == 0.6
    assert config.kl_reference == "behavior"


def test_mini_test_fixes_the_thresholds(tmp_path):
    config = _config(tmp_path, mini_test=True)
    assert (
        config.difficult_threshold == 0
        and config.high_quality_lower_range == [0.5, 0.5] == config.high_quality_upper_range
    )


def test_every_bapo_field_is_documented_under_one_heading():
    assert len(BAPO_FIELDS) == 50
    for field in BAPO_FIELDS:
        assert len(field.metadata.get("help", "")) > 20, field.name
    listed = [name for names in HEADINGS.values() for name in names]
    assert sorted(listed) == sorted([field.name for field in BAPO_FIELDS] + ["loss_type"])
    for heading in HEADINGS:
        assert f"> {heading}" in BAPOConfig.__doc__


def test_a_config_written_out_reads_back_the_same(tmp_path):
    """Thresholds resolve to their values when the config is built; built again from them, it is the same."""
    for settings in (dict(), dict(mini_test=True)):
        config = _config(tmp_path, **settings)
        again = _config(tmp_path, **{name: getattr(config, name) for name in THRESHOLD_FIELDS}, **settings)
        assert [getattr(again, name) for name in THRESHOLD_FIELDS] == [
            getattr(config, name) for name in THRESHOLD_FIELDS
        ]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(rollout_delay=0), "rollout_delay"),
        (dict(reevaluation_interval=0), "reevaluation_interval"),
        (dict(max_reevaluation_prompts=0), "max_reevaluation_prompts"),
        (dict(high_quality_buffer_steps=0), "high_quality_buffer_steps"),
        (dict(difficult_buffer_size=0), "difficult_buffer_size"),
        (dict(difficult_threshold=-0.1), "difficult_threshold"),
        (dict(difficult_threshold=1.0), "difficult_threshold"),
        (dict(high_quality_lower_range=[-0.1, 0.5]), "high_quality_lower_range"),
        (dict(high_quality_upper_range=[0.5, 1.5]), "high_quality_upper_range"),
        (dict(high_quality_lower_range=[0.5, 0.25]), "reversed"),
        (dict(high_quality_upper_range=[0.6, 0.3]), "reversed"),
        (dict(high_quality_lower_range=[0.5]), "high_quality_lower_range"),
        (dict(high_quality_lower_range=[0.3, 0.7], high_quality_upper_range=[0.2, 0.6]), "must not lie above"),
        (dict(online_filter="topk"), "online_filter"),
        (dict(online_filter_gaussian_std=0.0), "online_filter_gaussian_std"),
        (dict(online_filter_uniform_keep=0.0), "online_filter_uniform_keep"),
        (dict(online_filter_uniform_keep=1.5), "online_filter_uniform_keep"),
        (dict(kl_reference="initial"), "kl_reference"),
        (dict(mini_test=True, difficult_threshold=0.1), "mini_test"),
        (dict(mini_test=True, high_quality_lower_range=[0.25, 0.5]), "mini_test"),
        (dict(mini_test=True, online_filter="gaussian"), "mini_test"),
        (dict(num_generations=1, per_device_train_batch_size=1), "at least 2 generations"),
        (dict(rollout_delay=2, rollout_refresh_phase=2), "rollout_refresh_phase"),
        (dict(rollout_refresh_phase=-1), "rollout_refresh_phase"),
        (dict(high_quality_buffer_size=0), "high_quality_buffer_size"),
        (dict(difficult_admission="beats"), "difficult_admission"),
        (dict(shared_buffer=True, high_quality_buffer_size=8), "difficult_entry_after_update"),
        (dict(shared_buffer=True, difficult_entry_after_update=True), "high_quality_buffer_size"),
        (
            dict(
                shared_buffer=True,
                difficult_entry_after_update=True,
                high_quality_buffer_size=8,
                difficult_buffer_size=8,
            ),
            "must be below difficult_buffer_size",
        ),  # fmt: skip
        (dict(x3_anchor="pi_old"), "x3_anchor"),
        (dict(x3_anchor="stored"), "off_policy_correction='decoupled'"),
        (dict(batch_aggregation="tokens"), "batch_aggregation"),
        (dict(batch_aggregation="mini_batch", loss_type="grpo"), "token-normalised loss type"),
        (dict(use_vllm=True, vllm_enable_sleep_mode=True, rollout_delay=2, reevaluation_interval=2), "sleep_mode"),
        (dict(use_vllm=True, vllm_mode="colocate", vllm_tensor_parallel_size=2), "vllm_tensor_parallel_size"),
        (dict(kl_reference="behavior", beta=0.01, sync_ref_model=True), "sync_ref_model"),
        (dict(correctness_threshold=float("nan")), "correctness_threshold"),
        (dict(scale_rewards="batch"), "scale_rewards"),
        (dict(multi_objective_aggregation="normalize_then_sum"), "multi_objective_aggregation"),
        (dict(loss_type="grpoo"), "loss_type"),
    ],
)
def test_invalid_values_fail_at_construction_naming_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        _config(tmp_path, **kwargs)


def test_trainer_wants_a_bapo_config(tiny_model_path, tmp_path):
    grpo = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(TypeError, match="BAPOConfig"):
        BAPOTrainer(model=tiny_model_path, reward_funcs=exact_answer_reward, args=grpo)


def small_batch_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "A rollout batch holds B =" in str(w.message)]


@pytest.mark.parametrize(
    ("kwargs", "prompts"),
    [
        (dict(), 1),  # TRL's defaults on one process: 8 completions per device, 8 generations
        (dict(per_device_train_batch_size=24), 3),
        (dict(gradient_accumulation_steps=2, num_generations=4), 4),
        (dict(generation_batch_size=64), 8),
        (dict(online_filter="none", use_difficult_replay=False, use_high_quality_replay=False), 1),
    ],
)
def test_a_rollout_batch_below_4_prompts_warns_once_naming_the_fields(tmp_path, kwargs, prompts):
    settings = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kwargs)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        config = BAPOConfig(**settings)
    assert config.generation_batch_size // config.num_generations == prompts
    said = small_batch_warnings(record)
    filtering = config.online_filter != "none" or config.use_difficult_replay or config.use_high_quality_replay
    if prompts >= 4 or not filtering:
        assert said == []
        return
    assert len(said) == 1
    for name in (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "steps_per_generation",
        "generation_batch_size",
        "num_generations",
        "processes",
    ):
        assert name in said[0], name
    assert f"= {prompts} prompt(s)" in said[0] and "cannot work with so few prompts" in said[0]
