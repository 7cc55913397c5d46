"""BAPO's state in a checkpoint: one file per process, holding only tensors and plain containers.

Each process writes `bapo_state_{rank}.pt`: the buffers, counters and random generator (the same on every process)
and its own share of the rollout snapshot. Files are read with `torch.load(weights_only=True)`, as transformers
reads every checkpoint file, so loading a downloaded checkpoint runs no code. Dataset rows kept in B_bad may hold
images and arrays; they are stored as encoded bytes and tensors.
"""

from __future__ import annotations

import glob
import io
import os
import pickle
import sys
from typing import Any

import numpy as np
import torch

STATE_VERSION = 2
TAG = "__bapo_type__"
# What `torch.load(weights_only=True)` can fail with on a missing, truncated, foreign or tampered file.
UNREADABLE = (OSError, EOFError, RuntimeError, pickle.UnpicklingError)
_PLAIN = (str, int, float, bool, bytes, type(None), torch.Tensor)


def state_file(checkpoint: str, rank: int) -> str:
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


def write_state(path: str, state: dict[str, Any]) -> None:
    torch.save(encode(state), path)


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
