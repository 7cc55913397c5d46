"""BAPO's state in a checkpoint, and the policy for resuming from it: one file per process, holding only tensors and
plain containers.

Each process writes `bapo_state_{rank}.pt`: the buffers, counters and random generator (the same on every process)
and its own share of the rollout snapshot. On resume every process reads its own, and they decide together: if any
cannot, none resumes from them, so no process runs on with buffers the others lack. Files are read with
`torch.load(weights_only=True)`, as transformers reads every checkpoint file, so loading a downloaded checkpoint runs
no code. Dataset rows kept in B_bad may hold images and arrays; they are stored as encoded bytes and tensors.
"""

from __future__ import annotations

import glob
import io
import json
import os
import pickle
import sys
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from transformers.utils import logging

from trl_bapo.buffers import SharedBuffer
from trl_bapo.engines import local_shard, trainable_parameters
from trl_bapo.state import BAPOState

STATE_VERSION = 2
TAG = "__bapo_type__"
COMPLETE_FILE = "bapo_complete.json"
# What `torch.load(weights_only=True)` can fail with on a missing, truncated, foreign or tampered file.
UNREADABLE = (OSError, EOFError, RuntimeError, pickle.UnpicklingError)
_PLAIN = (str, int, float, bool, bytes, type(None), torch.Tensor)

logger = logging.get_logger(__name__)


def state_file(checkpoint: str, rank: int | str) -> str:
    return os.path.join(checkpoint, f"bapo_state_{rank}.pt")


def resume_advice(checkpoint: str) -> str:
    """What to do about a checkpoint whose BAPO state cannot be read, by what else it lacks: a checkpoint saved with
    `save_only_model=True` holds the model only, without the random states transformers writes beside every
    optimizer state (and BAPO's)."""
    if not glob.glob(os.path.join(checkpoint, "rng_state*.pth")):
        return (
            "It holds no optimizer or random state either, as a checkpoint saved with save_only_model=True, which "
            "writes only the model: train from its model instead (model_name_or_path), save with "
            "save_only_model=False to resume,"
        )
    return "Resume from a checkpoint written by BAPOTrainer,"


def flush_to_disk(path: str) -> None:
    """Waits until `path` (a file, or a folder's list of names) is on the disk, not only in the page cache: a
    checkpoint is marked complete only once what it names would survive a power cut."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_state(path: str, state: dict[str, Any]) -> None:
    """Writes beside `path`, flushes to disk and renames, so a save that fails (a full disk) or is killed never leaves
    a half file under the name resume reads."""
    staging = f"{path}.tmp"
    try:
        torch.save(encode(state), staging)
        flush_to_disk(staging)
        os.replace(staging, path)
        flush_to_disk(os.path.dirname(path) or ".")
    except (OSError, RuntimeError) as error:
        if os.path.exists(staging):
            os.remove(staging)
        raise RuntimeError(
            f"Could not write BAPO's state to {path} ({type(error).__name__}: {str(error).splitlines()[0]}). The "
            f"checkpoint {os.path.dirname(path)} stays incomplete (it gets no {COMPLETE_FILE}), so resuming with "
            "resume_from_checkpoint=True skips it for the newest complete one. Free space on that disk or choose "
            "another output_dir."
        ) from error


def unmark(checkpoint: str) -> None:
    """Before a save into `checkpoint` begins: a folder an earlier run had completed loses its marker, so that a save
    killed half-way, which leaves the two runs' files mixed, is not taken for complete; and its BAPO state files, so
    that one of a process this run does not have (an earlier run on more processes) is not read as this run's."""
    stale = [os.path.join(checkpoint, COMPLETE_FILE), *glob.glob(state_file(checkpoint, "*"))]
    found = [path for path in stale if os.path.exists(path)]
    for path in found:
        os.remove(path)
    if found:
        flush_to_disk(checkpoint)


def mark_complete(checkpoint: str, global_step: int, processes: int) -> None:
    """The checkpoint's last file, written once every process's files and the trainer's are on disk (flushed here
    first): only a checkpoint that has it is resumed from with resume_from_checkpoint=True."""
    for folder, _, names in os.walk(checkpoint):
        for name in names:
            flush_to_disk(os.path.join(folder, name))
        flush_to_disk(folder)
    staging = os.path.join(checkpoint, f"{COMPLETE_FILE}.tmp")
    with open(staging, "w") as file:
        json.dump({"global_step": global_step, "processes": processes}, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(staging, os.path.join(checkpoint, COMPLETE_FILE))
    flush_to_disk(checkpoint)


def checkpoint_step(checkpoint: str) -> int | None:
    """The optimizer step a checkpoint was written at: its trainer state's, else (none, or one a killed save left
    unreadable) its folder name's."""
    try:
        step = read_json(os.path.join(checkpoint, "trainer_state.json"))["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        step = None
    if isinstance(step, int):
        return step
    suffix = os.path.basename(os.path.normpath(checkpoint)).rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else None


def read_json(path: str) -> Any:
    """A JSON file; raises OSError or ValueError where it cannot be read (missing, truncated by a killed save)."""
    with open(path) as file:
        return json.load(file)


def unusable_reason(checkpoint: str) -> str | None:
    """Why resume_from_checkpoint=True cannot resume from a checkpoint (None: it can): its save did not finish, or
    a file that says where it stands cannot be read."""
    if not os.path.exists(os.path.join(checkpoint, COMPLETE_FILE)):
        return f"it has no {COMPLETE_FILE}, so its save did not finish (stopped or failed mid-save)"
    for name, key in ((COMPLETE_FILE, "global_step"), ("trainer_state.json", "global_step")):
        try:
            content = read_json(os.path.join(checkpoint, name))
        except (OSError, ValueError) as error:
            return f"its {name} cannot be read ({type(error).__name__}: {error})"
        if not isinstance(content, dict) or not isinstance(content.get(key), int):
            return f"its {name} holds no {key} (it holds {str(content)[:80]!r})"
    return None


def newest_complete_checkpoint(output_dir: str) -> str:
    """What resume_from_checkpoint=True resumes from: the newest checkpoint-N in `output_dir` whose save finished
    (it has COMPLETE_FILE) and whose trainer state can be read. Newer ones are skipped, each named in a warning with
    the reason."""
    found = [path for path in glob.glob(os.path.join(output_dir, "checkpoint-*")) if os.path.isdir(path)]
    found.sort(key=lambda path: checkpoint_step(path) or -1, reverse=True)
    skipped = []
    for path in found:
        reason = unusable_reason(path)
        if reason is None:
            for skip in skipped:
                logger.warning("Resuming from %s, not from %s", path, skip)
            return path
        skipped.append(f"{path}: {reason}")
    raise ValueError(
        f"resume_from_checkpoint=True found no complete checkpoint in {output_dir}"
        + (f" ({'; '.join(skipped)})" if skipped else "")
        + ". Pass resume_from_checkpoint=<path> to resume from a given one, or train without resuming."
    )


def read_state(path: str) -> dict[str, Any]:
    """The state stored at `path`, on the CPU; raises one of `UNREADABLE` when the file cannot be read safely."""
    return decode(torch.load(path, map_location="cpu", weights_only=True))


def unreadable_reason(error: Exception) -> str:
    """What went wrong in `read_state`, in one line. torch's own message for a file that is not plain data advises
    loading it with `weights_only=False`, which is exactly what a checkpoint from elsewhere must not get."""
    if isinstance(error, pickle.UnpicklingError):
        return "not a file of tensors and plain data, as BAPO writes them"
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def encode(value: Any, where: str = "state") -> Any:
    """`value` as tensors and plain containers; images become encoded bytes, arrays tensors."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict):
        return {key: encode(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(encode(item, f"{where}[{i}]") for i, item in enumerate(value))
    if isinstance(value, np.ndarray) and value.dtype != object:
        return {TAG: "ndarray", "data": torch.from_numpy(value.copy())}
    if isinstance(value, np.generic):
        return value.item()
    image_module = sys.modules.get("PIL.Image")  # an image can only be here if Pillow was imported
    if image_module is not None and isinstance(value, image_module.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG" if value.mode in {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"} else "TIFF")
        return {TAG: "image", "data": buffer.getvalue()}
    raise TypeError(
        f"BAPO cannot store {where} of type {type(value).__name__} in a checkpoint: B_bad keeps dataset rows, whose "
        "columns must be text, numbers, lists, dicts, tensors, arrays or PIL images. Convert that column, or drop "
        "it before training if no reward function reads it."
    )


def decode(value: Any) -> Any:
    if isinstance(value, dict):
        if value.get(TAG) == "ndarray":
            return value["data"].numpy()
        if value.get(TAG) == "image":
            from PIL import Image

            image = Image.open(io.BytesIO(value["data"]))
            image.load()
            return image
        return {key: decode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(decode(item) for item in value)
    return value


def save_state(
    output_dir: str, state: BAPOState, accelerator, sharded: bool, global_step: int, run: dict[str, Any]
) -> None:
    """Writes this process's state file into `output_dir`: the state, the trainer's own part of it (`run`: where
    the rollout step stands, the correctness decision), and what it was saved under (the optimizer step, the number
    of processes, whether the rollout snapshot holds shards, the configured sizes and thresholds). A write that fails
    on any process fails on every process at once, naming the file, instead of leaving the others waiting at the
    checkpoint's next collective until it times out."""
    rank, error = accelerator.process_index, None
    try:
        write_state(
            state_file(output_dir, rank),
            {
                "version": STATE_VERSION,
                "global_step": global_step,
                "processes": accelerator.num_processes,
                "sharded": sharded,
                "settings": state.settings(),
                "run": run,
                **state.state_dict(),
            },
        )
    except RuntimeError as caught:
        error = f"process {rank}: {caught}"
    errors = [e for e in (gather_object([error]) if accelerator.num_processes > 1 else [error]) if e]
    if errors:
        raise RuntimeError("; ".join(errors))


def load_state(
    checkpoint: str, state: BAPOState, accelerator, policy: torch.nn.Module, sharded: bool, allow_missing: bool
) -> dict[str, Any] | None:
    """Resumes `state` from `checkpoint`'s state files, on every process together, and returns this process's `run`
    part ({} from a file written before it existed; None when nothing was loaded); fails on every process with the
    same error when any of them cannot (unless `allow_missing`, `resume_without_bapo_state`, which starts with
    empty buffers)."""
    rank = accelerator.process_index
    saved, error = None, None
    try:
        saved = _checked_state(_own_state(checkpoint, rank), state, accelerator, policy, sharded)
        step = checkpoint_step(checkpoint)
        if saved.get("global_step", step) != step:
            raise ValueError(
                f"it was saved at optimizer step {saved['global_step']}, and the checkpoint is at step {step}: it "
                "belongs to another checkpoint"
            )
    except UNREADABLE as caught:
        error = f"process {rank} could not read {state_file(checkpoint, rank)} ({unreadable_reason(caught)})"
    except (KeyError, ValueError) as caught:
        error = f"process {rank} could not use {state_file(checkpoint, rank)} ({type(caught).__name__}: {caught})"
    errors = [e for e in (gather_object([error]) if accelerator.num_processes > 1 else [error]) if e]
    if not errors:
        for name, current in state.settings().items():
            if saved["settings"].get(name) != current:
                logger.warning(
                    "%s was %s in the checkpoint and is %s now; the configured value applies.",
                    name,
                    saved["settings"].get(name),
                    current,
                )
        state.load_state_dict(saved)
        return saved.get("run", {})
    if not allow_missing:
        raise ValueError(
            f"Cannot resume BAPO from {checkpoint}: {'; '.join(errors)}. Resuming without that state would "
            "silently empty the buffers and reset the thresholds and the rollout policy. "
            f"{resume_advice(checkpoint)} or set resume_without_bapo_state=True to start with empty buffers."
        )
    logger.warning("Resuming from %s with empty BAPO buffers: %s", checkpoint, "; ".join(errors))
    return None


def _own_state(checkpoint: str, rank: int) -> dict[str, Any]:
    """This process's state file; on a process the checkpoint's writers did not have (it was written by fewer
    processes), file 0, which holds the shared parts. A file missing on a process that did write is an error:
    another process's shards are no rollout policy of its own."""
    path = state_file(checkpoint, rank)
    if rank == 0 or os.path.exists(path):
        return read_state(path)
    state = read_state(state_file(checkpoint, 0))
    if rank < state["processes"]:
        raise FileNotFoundError(f"missing, though {state['processes']} processes wrote this checkpoint")
    return state


def _checked_state(
    saved: dict[str, Any], state: BAPOState, accelerator, policy: torch.nn.Module, sharded: bool
) -> dict[str, Any]:
    """`saved`, with its snapshot dropped where it cannot be placed: shards of another number of processes."""
    if saved["version"] != STATE_VERSION:
        raise ValueError(f"state version {saved['version']}, this trl-bapo reads version {STATE_VERSION}")
    shared = isinstance(state.buffers, SharedBuffer)
    if ("shared" in saved) != shared:
        raise ValueError(
            f"its buffers were written with shared_buffer={not shared}, and this run has shared_buffer={shared}"
        )
    processes = accelerator.num_processes
    if saved["sharded"] and saved["processes"] != processes:
        logger.warning(
            "The checkpoint's rollout snapshot holds the shards of %d processes, not %d; the rollout policy "
            "restarts from the current weights on the first step.",
            saved["processes"],
            processes,
        )
        saved["snapshot"] = {"step": None, "weights": {}}
    shards = {name: local_shard(param) for name, param in trainable_parameters(policy).items()}
    for name, tensor in saved["snapshot"]["weights"].items():
        if name not in shards or shards[name].shape != tensor.shape:
            raise ValueError(f"its rollout snapshot does not fit this model: parameter {name!r} differs")
    return saved
