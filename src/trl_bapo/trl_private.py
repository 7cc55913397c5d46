"""Every private part of TRL (and of transformers' Trainer) that trl-bapo touches, in one place, with what it is
used for. Checked against trl 1.16.0 and transformers 5.23; `tests/test_layout.py` fails, naming the part, when the
installed TRL lacks any of them, or when the code uses an attribute of TRL's objects that is not listed here. A TRL
upgrade starts here.

What counts as private, for the attributes of the objects TRL builds:
- on the trainer, public are what transformers' Trainer sets without an underscore (`model`, `args`, `accelerator`,
  `state`, `optimizer`, ...: transformers' documented API) and GRPOTrainer's constructor arguments it keeps under
  their own names (`reward_funcs`, `processing_class`, `train_dataset`, `tools`, `rollout_func`, ...). Everything
  else GRPOTrainer sets is private, with or without an underscore: copies of config fields (`num_generations`,
  `beta`, `pad_to_multiple_of`, ...) and what it derives (`reward_func_names`, `eos_token_ids`, ...), which TRL
  documents nowhere and may rename or stop setting in any release;
- TRL's vLLM generation (`trainer.vllm_generation`, `trl.generation.vllm_generation.VLLMGeneration`) is built by
  GRPOTrainer for itself: every attribute and method of it is private.
"""

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

# Attributes GRPOTrainer (or transformers' Trainer, for the underscored ones) sets, that BAPOTrainer reads or writes.
TRAINER_ATTRIBUTES = {
    "_dist": "which engine holds the parameters: its fsdp_version, is_fsdp, is_zero3",
    "_metrics": "the metrics TRL logs, per mode; BAPO adds its bapo/ ones and mutes re-evaluation's",
    "_logs": "the completions table, kept from re-evaluation",
    "_tokenizer": "its pad token pads rows of different rollouts",
    "_buffered_inputs": "the micro-batches of the current generation batch",
    "_step": "the micro-step counter that says when to generate",
    "num_generations": "the group size G: rows per prompt in every batch BAPO assembles and scores",
    "num_iterations": "micro-steps from one rollout step to the next (steps_per_generation x num_iterations)",
    "reward_func_names": "the names TRL logs each reward under: non-finite rewards and the correctness reward",
    "loss_type": "which of BAPO's losses (trl_bapo.losses.LOSSES) computes and normalises the loss",
    "beta": "the KL weight TRL's loss reads; kl.py sets it to 0 where beta weighs the behavior KL instead",
    "epsilon_low": "the lower clip bound TRL's loss reads; BAPO's dual clip sets it per batch (clipping.py)",
    "epsilon_high": "the upper clip bound, as epsilon_low",
    "importance_sampling_level": "token or sequence (GSPO) ratios, for the staleness metrics (staleness.py)",
    "entropy_coef": "the entropy bonus of BAPO's loss (losses.py)",
    "aux_loss_enabled": "whether the forward returns a router's auxiliary loss (behavior.py, losses.py)",
    "router_aux_loss_coef": "the weight of that auxiliary loss (losses.py)",
    "vllm_importance_sampling_correction": "whether TRL already weighs by the engine's log-probs (behavior.py)",
    "use_vllm": "which engine generates: vLLM (weights sent by vllm_sync.py) or transformers' generate",
    "environment_factories": "environments: the overlapped rollout refuses them (overlap.py)",
    "generation_kwargs": "TRL's sampling settings for transformers' generate, carried into the per-step sampler",
    "generation_config": "how transformers' generate decodes, checked against the per-step sampler (sampling.py)",
    # Read by TRL's engine call (`_generate_single_turn`) from the view of the trainer it runs on (sampling.py).
    "use_transformers_continuous_batching": "TRL's engine call reads it: copied onto the engine call's view",
    "continuous_batching_config": "TRL's engine call reads it: copied onto the engine call's view",
    "pad_to_multiple_of": "TRL's engine call pads prompts with it: copied onto the engine call's view",
    "eos_token_ids": "TRL's engine call stops generation at them: copied onto the engine call's view",
    "_is_vlm": "TRL's engine call reads it: copied onto the engine call's view",
    "_image_pad_token_id": "TRL's engine call reads it for images: copied onto the engine call's view",
    "_video_pad_token_id": "TRL's engine call reads it for videos: copied onto the engine call's view",
}

# Set by GRPOTrainer only with `use_vllm`.
VLLM_TRAINER_ATTRIBUTES = {
    "_last_loaded_step": "the global step the engine was last sent weights at: BAPO decides when (alpha)",
    "vllm_generation": "TRL's vLLM generation, which vllm_sync.py sends weights and sampling.py a seed",
}

# Attributes of trl.generation.vllm_generation.VLLMGeneration; `llm` is set only in colocate mode.
VLLM_GENERATION_ATTRIBUTES = {
    "mode": "server or colocate: how vllm_sync.py sends the weights",
    "enable_sleep_mode": "with sleep mode TRL's own sync wakes the weights up before loading them (vllm_sync.py)",
    "llm": "the colocated engine: the weights' reload runs in its workers (vllm_sync.py)",
    "generation_kwargs": "the engine's sampling settings: a per-step seed is added to a copy (sampling.py), the "
    "adapter a server request names is set in them (lora_sync.py)",
    "vllm_client": "TRL's client of the server: its address, its settings and the prefix-cache reset (lora_sync.py)",
    "model": "the model TRL generates for: a PEFT model's adapter may go to the server by file (lora_sync.py)",
    "accelerator": "the main process talks to the server; the device says whether NCCL can run (lora_sync.py)",
    "_dist": "whether ZeRO-3 partitions the adapter, which TRL's adapter save does not gather (lora_sync.py)",
    "server_base_url": "where the server is, read to connect as TRL's `_init_vllm` does (lora_sync.py)",
    "server_host": "where the server is, read to connect as TRL's `_init_vllm` does (lora_sync.py)",
    "server_port": "where the server is, read to connect as TRL's `_init_vllm` does (lora_sync.py)",
    "group_port": "TRL's client takes it, read to connect as TRL's `_init_vllm` does (lora_sync.py)",
    "server_timeout": "how long to wait for the server, read to connect as TRL's `_init_vllm` does (lora_sync.py)",
}

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
VLLM_GENERATION_METHODS = {
    "_iter_named_params": "TRL's walk over the weights, gathered and merged (vllm_sync.py)",
    "sync_weights": "TRL's sync, used in server mode and with sleep mode (vllm_sync.py)",
    "_init_vllm": "overridden: in server mode, connects without NCCL where a PEFT adapter goes by file (lora_sync.py)",
    "generate": "overridden: refuses image prompts on the adapter path (TRL names the base model) (lora_sync.py)",
}
