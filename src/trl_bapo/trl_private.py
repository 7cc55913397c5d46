"""Every private part of TRL (and of transformers' Trainer) that trl-bapo touches, in one place, with what it is
used for. Checked against trl 1.16.0 and transformers 5.23; `tests/test_layout.py` fails, naming the part, when the
installed TRL lacks any of them. A TRL upgrade starts here."""

from __future__ import annotations

TRL_VERSION = "1.16.0"

# Methods of GRPOTrainer or transformers' Trainer that BAPOTrainer overrides or calls.
TRAINER_METHODS = {
    "_prepare_inputs": "overridden: builds BAPO's batch on generation steps (trainer.py)",
    "_calculate_rewards": "overridden: keeps the gathered rewards per function (trainer.py)",
    "_generate_and_score_completions": "called: TRL's generation and scoring of a rollout (scoring.py)",
    "_get_per_token_logps_and_entropies": "called: TRL's forward (behavior.py); wrapped by behavior.after_forward",
    "_save_optimizer_and_scheduler": "overridden (transformers): BAPO's state beside the optimizer's",
    "_load_optimizer_and_scheduler": "overridden (transformers): BAPO's state read back on resume",
    "_save_checkpoint": "overridden (transformers): the checkpoint is marked complete once every file is on disk",
    "_get_output_dir": "called (transformers): the run folder the checkpoint was written into",
    "_generate_single_turn": "overridden and called: TRL's engine call, seeded or prefetched (overlap.py)",
    "_tokenize_prompts": "called: a prefetch tokenizes the next step's prompts as TRL's `_generate` does (overlap.py)",
}

# Attributes GRPOTrainer sets in `__init__` that BAPOTrainer reads or writes.
TRAINER_ATTRIBUTES = {
    "_dist": "which engine holds the parameters: its fsdp_version, is_fsdp, is_zero3",
    "_metrics": "the metrics TRL logs, per mode; BAPO adds its bapo/ ones and mutes re-evaluation's",
    "_logs": "the completions table, kept from re-evaluation",
    "_tokenizer": "its pad token pads rows of different rollouts",
    "_buffered_inputs": "the micro-batches of the current generation batch",
    "_step": "the micro-step counter that says when to generate",
}

# Set by GRPOTrainer only with `use_vllm`: the global step the engine was last sent weights at.
VLLM_TRAINER_ATTRIBUTES = {"_last_loaded_step": "BAPO decides when the engine gets weights (alpha)"}

# Class attributes of TRL's BaseTrainer that BAPOTrainer sets: what the model card writes.
TRAINER_CLASS_ATTRIBUTES = {
    "_tag_names": "the model card's tags (trainer.py)",
    "_name": "the trainer's name in the model card (trainer.py)",
    "_paper": "the paper the model card cites (trainer.py)",
}

# Attributes of the trainer's `_dist` (trl.distributed).
DIST_ATTRIBUTES = ("fsdp_version", "is_fsdp", "is_zero3")

# Private functions of TRL's modules, by module.
FUNCTIONS = {
    "trl.cli.commands.training": {"_subtract_subsequence": "splits the CLI's arguments as `trl grpo` does (cli.py)"},
}

# Methods of trl.generation.vllm_generation.VLLMGeneration.
VLLM_GENERATION_METHODS = {"_iter_named_params": "TRL's walk over the weights, gathered and merged (vllm_sync.py)"}
