"""Alpha's LoRA adapter to a vLLM server by file.

With a PEFT model and `vllm_mode="server"`, BAPO writes the adapter to a folder and has the server load it through
vLLM's LoRA endpoint. TRL's GRPOTrainer instead merges the adapter and streams every weight over NCCL. The helpers
are TRL's own, those of its AsyncGRPOTrainer (trl 1.16.0, `trl.experimental.async_grpo`), called here, not copied.
This path needs no CUDA, so it also runs against a CPU server, and each refresh sends only the adapter's bytes.

The server serves each adapter under a name, beside the base model. A request picks one by its `model` field, which
TRL's client takes from the generation's `generation_kwargs` (so BAPO refuses a `generation_kwargs["model"]` of the
user's own). The names carry the run's own id, drawn when the trainer is built, so that two runs sharing a server
never name each other's adapters:
- `bapo-{run}-alpha-t{t}`: alpha, taken at rollout step t. It is loaded when alpha is refreshed (every
  `rollout_delay` rollout steps, where GRPO would sync at every one) and named by every rollout of its window,
  prefetched ones included.
- `bapo-{run}-current-s{s}`: the current weights at optimizer step s. It is loaded when re-evaluation, evaluation or
  prompt tracking first needs them at s.

When an adapter replaces another of its kind, the old name is unloaded, since no request can name it again. Its
folder (under `<output_dir>/_vllm_lora/`) is deleted at the next load: vLLM reads an adapter's files again whenever it
has evicted the adapter from its cache. Before a generation names an adapter, the main process asks the server
which adapters it holds: a server restarted during the run holds none, and gets the adapter again from its folder,
with a warning. When training ends, however it ends, and after an evaluation outside training, BAPO unloads its
adapters; a trainer that could not reach the server then leaves them there, under names no later run draws.

Only the main process talks to the server. TRL's server mode also generates there, for the prompts of every process.
Every process writes the adapter, since writing gathers FSDP2 shards, but only the main process writes the files.

The server needs:
- `--enable-lora`;
- a `--max-lora-rank` of at least the adapter's rank;
- `--max-loras 2` or more (alpha and the current weights); 3 is better: an adapter is loaded before the one it
  replaces is unloaded, and with 2 slots vLLM evicts the other kind's adapter from its cache, to read it from its
  folder again at its next request;
- `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`, and `VLLM_SERVER_DEV_MODE=1`, which TRL's server mode needs anyway.

Sometimes the adapter cannot go by file:
- a server without LoRA, a data-parallel server, or an adapter vLLM cannot serve (these are TRL's reasons,
  `select_adapter_sync`);
- image prompts (a train or eval dataset with an `image` or `images` column), whose requests TRL sends to the base
  model by name; a batch with images on the adapter path is an error, since it would generate with the base model;
- ZeRO-3, which TRL's adapter save does not gather.

The weights then go TRL's way, merged over NCCL, which needs CUDA. On a GPU that comes with a warning naming the
reason; anywhere else it is an error naming it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

from accelerate.utils import broadcast_object_list, is_peft_model
from torch import nn
from transformers.utils import logging as transformers_logging
from trl.generation.vllm_client import VLLMClient
from trl.generation.vllm_generation import VLLMGeneration
from trl.import_utils import TRLExperimentalWarning

logger = transformers_logging.get_logger(__name__)

# transformers' `push_to_hub` leaves out `_*` under output_dir, as it should these adapters.
ADAPTER_FOLDER = "_vllm_lora"
# Adapters BAPO's requests can name at a time: alpha's and the current weights'.
SERVED_ADAPTERS = 2
# The module whose `select_adapter_sync` logs why an adapter cannot go by file.
TRL_ADAPTER_SYNC = "trl.experimental.async_grpo.async_grpo_trainer"


def _async_grpo():
    # TRL's experimental package warns on import; BAPO calls its stable helpers only, named in this module.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TRLExperimentalWarning)
        from trl.experimental.async_grpo import async_grpo_trainer, vllm_client
    return async_grpo_trainer, vllm_client


IMAGE_COLUMNS = ("image", "images")  # the columns TRL reads a prompt's images from


def has_image_column(*datasets: Any) -> bool:
    """Whether any of the datasets (a dataset, a dict of them, or None) has a column TRL reads images from."""
    for dataset in datasets:
        for one in dataset.values() if isinstance(dataset, dict) else [dataset]:
            if set(getattr(one, "column_names", None) or ()) & set(IMAGE_COLUMNS):
                return True
    return False


@contextmanager
def server_generation(args, image_prompts: bool) -> Iterator[None]:
    """Wraps GRPOTrainer's constructor so that, in server mode, TRL builds BAPO's `ServerGeneration` (trl 1.16.0
    builds `VLLMGeneration` there, under its module's name); `image_prompts`: whether the datasets hold images."""
    import trl.trainer.grpo_trainer as grpo

    if not (args.use_vllm and args.vllm_mode == "server"):
        yield
        return
    grpo.VLLMGeneration = type("ServerGeneration", (ServerGeneration,), {"image_prompts": image_prompts})
    try:
        yield
    finally:
        grpo.VLLMGeneration = VLLMGeneration


class ServerGeneration(VLLMGeneration):
    """TRL's vLLM generation (trl 1.16.0). For a PEFT model in server mode, it connects to the server without TRL's
    NCCL weight transfer wherever alpha's adapter can go by file (`adapter_sync`)."""

    adapter_sync = False
    image_prompts = False

    def _init_vllm(self) -> None:
        if self.mode != "server" or not is_peft_model(self.model):
            return super()._init_vllm()
        # This is TRL's server branch without its `init_communicator`, which opens the NCCL transfer (and refuses
        # any device but CUDA).
        if self.accelerator.is_main_process:
            base_url = self.server_base_url or f"http://{self.server_host}:{self.server_port}"
            self.vllm_client = VLLMClient(
                base_url=base_url, group_port=self.group_port, connection_timeout=self.server_timeout
            )
        refusal = _on_main_process(self.accelerator, lambda: adapter_refusal(self))
        self.adapter_sync = refusal is None
        if not self.adapter_sync:
            if self.accelerator.device.type != "cuda":
                raise RuntimeError(
                    f"BAPO sends a PEFT model's adapter to the vLLM server as a file, and cannot here: {refusal} The "
                    "fallback, TRL's, merges the adapter and sends every weight over NCCL, which needs CUDA (this "
                    f"process runs on {self.accelerator.device})."
                )
            logger.warning(f"Sending merged weights over NCCL instead of alpha's adapter by file: {refusal}")
            if self.accelerator.is_main_process:
                self.vllm_client.init_communicator(device=self.accelerator.device)
        elif "model" in self.generation_kwargs:
            raise ValueError(
                f"generation_kwargs['model'] = {self.generation_kwargs['model']!r}: on the vLLM server BAPO names "
                "alpha's adapter (or the current weights') in each request's `model` field, and would replace yours. "
                "Remove 'model' from generation_kwargs."
            )
        # As TRL's own: every process goes on once the main process is done with the server.
        self.accelerator.wait_for_everyone()

    def generate(self, prompts, images, num_generations, profiler=None) -> tuple:
        if self.adapter_sync and images is not None and any(image is not None for image in images):
            raise RuntimeError(
                "A batch of prompts with images reached the vLLM server on BAPO's adapter path, where TRL would "
                "generate them with the base model instead of alpha's adapter. Name the images in an `image` or "
                "`images` column of the train and eval datasets, so that BAPO sends merged weights instead (this "
                "needs CUDA), or train on text prompts."
            )
        return super().generate(prompts, images, num_generations, profiler)


def adapter_refusal(generation: VLLMGeneration) -> str | None:
    """Why the adapter of `generation.model` cannot go to the server by file, or None if it can. Raises an error
    where the server's launch line is wrong for it (`--max-lora-rank`, `--max-loras`)."""
    if generation.image_prompts:
        return "image prompts go through vLLM's `/inference/v1/generate`, whose request TRL names with the base model."
    if generation._dist.is_zero3 or generation._dist.fsdp_version == 1:
        return "DeepSpeed ZeRO-3 and FSDP1 split the adapter, and TRL's adapter save gathers FSDP2 shards only."
    # What TRL's own check (`validate_lora_for_vllm_sync`) lets through but the adapter file does not carry.
    config = generation.model.peft_config[generation.model.active_adapter]
    if getattr(config, "trainable_token_indices", None):
        return "trainable_token_indices trains embedding rows that the adapter file does not hold."
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and init.split("_")[0] in {"pissa", "olora", "corda", "loftq"}:
        return f"init_lora_weights={init!r} changes the base weights, which the server's base model does not have."
    info = generation.vllm_client.get_server_info()
    # `max_staleness=-1` asks TRL's check for one adapter slot; BAPO checks its own number of slots below.
    with _logged_by(TRL_ADAPTER_SYNC) as reasons:
        if not _async_grpo()[0].select_adapter_sync(info, generation.model, SimpleNamespace(max_staleness=-1)):
            return " ".join(reasons)
    slots = info["lora_config"]["max_loras"]
    if slots < SERVED_ADAPTERS:
        raise ValueError(
            f"The vLLM server was started with `--max-loras {slots}`, but BAPO's requests name {SERVED_ADAPTERS} "
            "adapters at a time: alpha's, and the current weights' (re-evaluation, evaluation, prompt tracking). "
            f"Restart it with `--max-loras {SERVED_ADAPTERS}`."
        )
    return None


def _on_main_process(accelerator, decide: Callable[[], Any]) -> Any:
    """`decide()` run on the main process, with its result, or its error, given to every process."""
    outcome = [None]
    if accelerator.is_main_process:
        try:
            outcome = [(decide(), None)]
        except Exception as error:  # raised on every process below, so that none waits for the others
            outcome = [(None, error)]
    broadcast_object_list(outcome, from_process=0)
    result, error = outcome[0]
    if error is not None:
        raise error
    return result


@contextmanager
def _logged_by(name: str) -> Iterator[list[str]]:
    """Holds back what the logger `name` logs inside the block and collects the messages, so that BAPO can say them
    in one message of its own."""
    held, handler = [], logging.Handler(logging.WARNING)
    # accelerate's logger (TRL's here) puts the process in front: BAPO's message is the main process's anyway.
    handler.emit = lambda record: held.append(re.sub(r"^\[RANK \d+\] ", "", record.getMessage()))
    module_logger = logging.getLogger(name)
    module_logger.addHandler(handler)
    propagate, module_logger.propagate = module_logger.propagate, False
    try:
        yield held
    finally:
        module_logger.removeHandler(handler)
        module_logger.propagate = propagate


class ServerAdapters:
    """The adapters BAPO has loaded into the vLLM server (`alpha`, `current`: their names), and which one generations
    name."""

    def __init__(self, generation: ServerGeneration, output_dir: str):
        self.generation = generation
        # The server reads the folder itself, and would take a relative path for a Hub repository's name.
        self.folder = os.path.join(os.path.abspath(output_dir), ADAPTER_FOLDER)
        self.loaded: dict[str, str | None] = {"alpha": None, "current": None}
        self._stale: list[str] = []  # folders of unloaded adapters, deleted at the next load
        self._main = generation.accelerator.is_main_process
        self.run = _on_main_process(generation.accelerator, lambda: uuid.uuid4().hex[:8])
        if self._main:
            self._client = _async_grpo()[1].VLLMClient(generation.vllm_client.base_url)
            shutil.rmtree(self.folder, ignore_errors=True)  # an earlier run's adapters, which nothing names now

    def name(self, kind: str, step: int) -> str:
        """The server's name for alpha taken at rollout step `step`, or for the current weights at optimizer step
        `step`."""
        return f"bapo-{self.run}-alpha-t{step}" if kind == "alpha" else f"bapo-{self.run}-current-s{step}"

    def holds(self, name: str) -> bool:
        return name in self.loaded.values()

    def load(self, kind: str, name: str, model: nn.Module) -> None:
        """Has the server serve the adapter now in `model` (the unwrapped PEFT model) as `name`, in place of the
        adapter of this kind it served before. Every process calls it."""
        path = os.path.join(self.folder, name)
        _async_grpo()[0].save_lora_adapter(model, self.generation.accelerator, model.active_adapter, path)
        replaced, self.loaded[kind] = self.loaded[kind], name
        if not self._main:
            return
        for folder in self._stale:
            shutil.rmtree(folder, ignore_errors=True)
        self._stale = []
        self._client.load_lora_adapter(name, path)
        if replaced is not None:
            self._client.unload_lora_adapter(replaced)
            self._stale.append(os.path.join(self.folder, replaced))
        self.generation.vllm_client.reset_prefix_cache()

    def select(self, name: str) -> None:
        """Generations from now on name `name`; each engine call's view copies the setting (`engine_view`). A server
        that no longer holds the adapter (restarted during the run) loads it again from its folder."""
        if self._main and name not in self._served():
            logger.warning(
                f"The vLLM server no longer holds adapter {name!r} (was it restarted?); loading it again from "
                f"{os.path.join(self.folder, name)}."
            )
            self._client.load_lora_adapter(name, os.path.join(self.folder, name))
        # A new dict: TRL's generation shares its first one with the config's `generation_kwargs`.
        self.generation.generation_kwargs = {**self.generation.generation_kwargs, "model": name}

    def close(self) -> None:
        """Unloads this run's adapters from the server (at the end of training), whose slots no request needs. The
        next generation loads what it needs again: a later `train()` counts its steps from 0 again, or from a
        checkpoint, and must not take an adapter of this one for its own."""
        loaded, self.loaded = self.loaded, dict.fromkeys(self.loaded)
        if not self._main:
            return
        import requests  # server mode's client needs it; trl_bapo itself does not

        for name in filter(None, loaded.values()):
            try:
                self._client.unload_lora_adapter(name)
            except requests.RequestException as error:  # training may be ending because the server went away
                logger.warning(f"Could not unload adapter {name!r} from the vLLM server: {error}")

    def _served(self) -> set[str]:
        import requests

        response = requests.get(f"{self._client.server_url}/v1/models", timeout=self.generation.server_timeout)
        response.raise_for_status()
        return {model["id"] for model in response.json()["data"]}
