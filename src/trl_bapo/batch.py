"""Row operations on TRL's scored batch (the dict `GRPOTrainer._generate_and_score_completions` returns).

BAPO's training batch is assembled from rows of different rollouts (X1, X2, X3), so it needs to select rows,
concatenate batches padded to different widths, and cut a batch of any size into micro-batches with a loss
scale that keeps the optimizer step's objective a mean over the whole assembled batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object

from trl_bapo.correction import ANCHOR_LOGPS

# Per-row 2-D fields and their padding: prompts are left-padded, completions right-padded (as TRL pads them).
LEFT_PADDED = {"prompt_ids", "prompt_mask"}
RIGHT_PADDED = {
    "completion_ids",
    "completion_mask",
    "tool_mask",
    "old_per_token_logps",
    "ref_per_token_logps",
    "sampling_per_token_logps",
    "importance_sampling_ratio",
    ANCHOR_LOGPS,
}
PAD_VALUES = {"tool_mask": 1, "importance_sampling_ratio": 1.0}
TOKEN_IDS = {"prompt_ids", "completion_ids"}  # padded with the tokenizer's pad token, everything else as above or 0
# Per-token fields over prompt and completion: TRL extends the prompt's token types with zeros for the completion,
# so the first prompt-width columns are left-padded like prompt_ids and the rest right-padded like completion_ids.
SPANNING = {"token_type_ids", "mm_token_type_ids"}
# Fields that hold one value for the whole batch rather than one per row.
BATCH_SCALARS = {"num_items_in_batch", "bapo_loss_scale"}


def num_rows(batch: dict[str, Any]) -> int:
    return batch["completion_ids"].shape[0]


def loss_mask(batch: dict[str, Any]) -> torch.Tensor:
    mask = batch["completion_mask"]
    return mask if "tool_mask" not in batch else mask * batch["tool_mask"]


def field_kind(key: str, value: Any) -> str:
    """How a field of the batch goes along with its rows: 'scalar' (one value for the batch), 'list' (one Python
    object per row), 'spanning' (token columns over prompt and completion), 'padded' (one padded row of tokens per
    row) or 'rows' (one value per row)."""
    if key in BATCH_SCALARS or value is None:
        return "scalar"
    if not isinstance(value, torch.Tensor):
        return "list"
    if key in SPANNING:
        return "spanning"
    return "padded" if value.dim() >= 2 else "rows"


def select_rows(batch: dict[str, Any], rows: torch.Tensor | list[int]) -> dict[str, Any]:
    """The given rows of every per-row field, in the given order."""
    index = torch.as_tensor(rows, dtype=torch.long)
    selected = {}
    for key, value in batch.items():
        kind = field_kind(key, value)
        if kind == "scalar":
            selected[key] = value
        elif kind == "list":
            selected[key] = [value[i] for i in index.tolist()]
        else:
            selected[key] = value[index.to(value.device)]
    return selected


def _pad_to(tensor: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
    missing = (width - tensor.shape[1], 0) if left else (0, width - tensor.shape[1])
    return F.pad(tensor, (0, 0) * (tensor.dim() - 2) + missing, value=value)


def _pad_value(key: str, pad_token_id: int) -> float:
    return pad_token_id if key in TOKEN_IDS else PAD_VALUES.get(key, 0)


def _split_spanning(batch: dict[str, Any], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt and completion columns of a per-token field that spans both."""
    width = batch["prompt_ids"].shape[1]
    return batch[key][:, :width], batch[key][:, width:]


def _concat_padded(values: list[torch.Tensor], value: float, left: bool) -> torch.Tensor:
    width = max(tensor.shape[1] for tensor in values)
    return torch.cat([_pad_to(tensor, width, value, left) for tensor in values])


def concat_batches(batches: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Stacks the rows of several scored batches; 2-D fields are padded to the widest part."""
    keys = set(batches[0])
    for batch in batches[1:]:
        if set(batch) != keys:
            raise ValueError(f"Cannot concatenate batches with different fields: {sorted(keys ^ set(batch))}.")
    merged = {}
    for key, first in batches[0].items():
        values = [batch[key] for batch in batches]
        kind = field_kind(key, first)
        if kind == "scalar":
            merged[key] = first
        elif kind == "list":
            merged[key] = [item for value in values for item in value]
        elif kind == "rows":
            merged[key] = torch.cat(values)
        elif kind == "spanning":
            prompts, completions = zip(*(_split_spanning(batch, key) for batch in batches))
            merged[key] = torch.cat([_concat_padded(prompts, 0, True), _concat_padded(completions, 0, False)], 1)
        elif key in LEFT_PADDED | RIGHT_PADDED:
            merged[key] = _concat_padded(values, _pad_value(key, pad_token_id), key in LEFT_PADDED)
        elif len({value.shape[1] for value in values}) > 1:
            raise NotImplementedError(f"BAPO cannot re-pad the batch field {key!r} across rollouts.")
        else:
            merged[key] = torch.cat(values)
    return merged


def unmeasured_rows(logps: torch.Tensor) -> torch.Tensor:
    """Rows whose behavior log-probs are still the NaN placeholder. After `concat_batches` re-pads a row next
    to a wider part, only its original columns are NaN, so any NaN marks the row."""
    return torch.isnan(logps).any(dim=1)


def gather_batch(batch: dict[str, Any], accelerator: Accelerator, pad_token_id: int) -> dict[str, Any]:
    """The rows of every process, in process order, on every process (padded to the widest process)."""
    if accelerator.num_processes == 1:
        return batch

    def gather_padded(tensor: torch.Tensor, value: float, left: bool) -> torch.Tensor:
        return accelerator.gather(accelerator.pad_across_processes(tensor, dim=1, pad_index=value, pad_first=left))

    gathered = {}
    for key, value in batch.items():
        kind = field_kind(key, value)
        if kind == "scalar":
            gathered[key] = value
        elif kind == "list":
            gathered[key] = gather_object(value)
        elif kind == "rows":
            gathered[key] = accelerator.gather(value)
        elif kind == "spanning":
            prompt, completion = _split_spanning(batch, key)
            gathered[key] = torch.cat([gather_padded(prompt, 0, True), gather_padded(completion, 0, False)], dim=1)
        else:
            gathered[key] = gather_padded(value, _pad_value(key, pad_token_id), key in LEFT_PADDED)
    return gathered


def masked_row(batch: dict[str, Any]) -> dict[str, Any]:
    """One row of `batch` that carries no loss: fills a micro-batch that has no rows of its own, so that
    every micro-step still runs a forward and backward pass (and distributed ranks stay in step)."""
    row = select_rows(batch, [0])
    row["completion_mask"] = torch.zeros_like(row["completion_mask"])
    row["advantages"] = torch.zeros_like(row["advantages"])
    return row


def cut_batch(
    batch: dict[str, Any], args, processes: int, normalisation: str, filler: dict[str, Any], pad_token_id: int
) -> tuple[list[dict[str, Any]], list[bool]]:
    """The assembled batch as every process's micro-batches (process p's micro-step i is chunk p * steps + i), as
    `args.batch_aggregation` says, and which optimizer steps of the rollout step are skipped (they have no rows).
    Every process holds the whole batch and takes its own share, so all of them run the same number of
    forward/backward passes whatever the batch size."""
    steps, accumulation = args.steps_per_generation, args.gradient_accumulation_steps
    if args.batch_aggregation == "mini_batch":
        return split_mini_batches(
            batch,
            steps,
            accumulation,
            processes,
            args.per_device_train_batch_size,
            normalisation,
            filler,
            pad_token_id,
        )
    chunks = split_micro_batches(
        batch, steps * processes, normalisation, filler, pad_token_id, equal_sizes=processes > 1
    )
    return chunks, [num_rows(batch) == 0] * (steps // accumulation)


def split_micro_batches(
    batch: dict[str, Any],
    num_chunks: int,
    normalisation: str,
    filler: dict[str, Any],
    pad_token_id: int,
    equal_sizes: bool = False,
) -> list[dict[str, Any]]:
    """Cuts `batch` into `num_chunks` micro-batches whose sizes differ by at most one row (`batch_aggregation=
    "spread"`).

    TRL's `split_tensor_dict` assumes the rows divide evenly and drops the remainder; BAPO's batch size varies
    per step. Each chunk carries `bapo_loss_scale`, the factor that turns the loss's per-micro-batch normalisation
    (`normalisation`, as `trl_bapo.losses.LOSSES` gives it) into a mean over the whole batch: with equal chunks it
    is exactly 1. A chunk without rows gets `filler` (a row without loss) and scale 0. With `equal_sizes`, filler
    rows bring every chunk to the same size, because TRL gathers per-sequence metrics across processes and needs
    equal shapes on every process.
    """
    total = num_rows(batch)
    tokens = loss_mask(batch).sum(dim=1).float()
    pieces = list(torch.tensor_split(torch.arange(total), num_chunks))
    scales = [
        _chunk_scale(
            len(rows), float(tokens[rows].sum()), total, float(tokens.sum()), num_chunks, normalisation, equal_sizes
        )
        if len(rows)
        else 0.0
        for rows in pieces
    ]
    return _chunks(batch, pieces, scales, filler, pad_token_id, equal_sizes)


def split_mini_batches(
    batch: dict[str, Any],
    steps: int,
    accumulation: int,
    processes: int,
    micro_batch_rows: int,
    normalisation: str,
    filler: dict[str, Any],
    pad_token_id: int,
) -> tuple[list[dict[str, Any]], list[bool]]:
    """Cuts `batch` as the authors' code trains on it (`batch_aggregation="mini_batch"`; github waunx/BAPO_ICLR,
    verl/workers/actor/dp_actor.py, `update_policy`): into mini-batches of a full optimizer step's rows, M =
    `micro_batch_rows` x `accumulation` x `processes`, one optimizer step each; the steps left over get filler rows
    and are skipped. A mini-batch's rows are shared by the processes, then by their micro-batches. Each micro-batch's
    loss becomes its token mean times its rows over `micro_batch_rows` x `accumulation` (their `len(micro_batch) /
    ppo_mini_batch_size`), so a partial mini-batch's step is smaller in proportion.

    Returns the `steps x processes` micro-batches, process after process (process p's micro-step i is chunk
    p * steps + i), and for each of the `steps // accumulation` optimizer steps whether it is skipped. A batch larger
    than the configured steps hold (dynamic sampling, X2 uncapped) fills them with more rows each.
    """
    total, updates = num_rows(batch), steps // accumulation
    full = micro_batch_rows * accumulation * processes
    per_update = max(full, -(-total // updates))
    used = -(-total // per_update)
    tokens = loss_mask(batch).sum(dim=1).float()
    pieces = [torch.tensor([], dtype=torch.long)] * (steps * processes)
    scales = [0.0] * (steps * processes)
    for update in range(used):
        rows = torch.arange(update * per_update, min((update + 1) * per_update, total))
        for index, part in enumerate(torch.tensor_split(rows, processes * accumulation)):
            chunk = (index // accumulation) * steps + update * accumulation + index % accumulation
            pieces[chunk] = part
            micro_tokens = float(tokens[part].sum())
            if micro_tokens > 0:
                scales[chunk] = _mini_batch_scale(
                    len(part), micro_tokens, per_update // processes, float(tokens.sum()), accumulation, steps,
                    processes, normalisation,
                )  # fmt: skip
    chunks = _chunks(batch, pieces, scales, filler, pad_token_id, equal_sizes=processes > 1)
    return chunks, [update >= used for update in range(updates)]


def _chunks(
    batch: dict[str, Any],
    pieces: list[torch.Tensor],
    scales: list[float],
    filler: dict[str, Any],
    pad_token_id: int,
    equal_sizes: bool,
) -> list[dict[str, Any]]:
    """The micro-batches holding the given rows of `batch`, each with its loss scale; one without rows holds
    `filler`, and with `equal_sizes` filler rows bring all to the size of the largest."""
    size = max(1, max(len(rows) for rows in pieces)) if equal_sizes else 1
    chunks = []
    for rows, scale in zip(pieces, scales):
        parts = [select_rows(batch, rows)] if len(rows) else []
        parts += [filler] * (size - len(rows) if equal_sizes else int(not len(rows)))
        chunk = concat_batches(parts, pad_token_id) if len(parts) > 1 else dict(parts[0])
        chunk["bapo_loss_scale"] = scale
        chunks.append(chunk)
    return chunks


def _chunk_scale(
    rows: int,
    tokens: float,
    total_rows: int,
    total_tokens: float,
    num_chunks: int,
    normalisation: str,
    equal_sizes: bool,
) -> float:
    # Per-sequence losses average over every row of the micro-batch, filler rows included.
    if normalisation == "sequence":
        size = max(1, -(-total_rows // num_chunks)) if equal_sizes else rows
        return size * num_chunks / total_rows
    if normalisation == "token":
        return tokens * num_chunks / total_tokens if total_tokens > 0 else 0.0
    if normalisation == "global":
        return 1.0
    raise ValueError(f"BAPOTrainer does not know how a loss normalised by {normalisation!r} splits a batch.")


def _mini_batch_scale(
    rows: int,
    tokens: float,
    process_rows: int,
    total_tokens: float,
    accumulation: int,
    steps: int,
    processes: int,
    normalisation: str,
) -> float:
    """The factor that turns TRL's loss of a micro-batch into the authors' token mean x rows / process_rows: TRL
    divides a 'token' loss by the accumulation steps, and a 'global' one by its share of the batch's tokens (trl
    1.16.0, `GRPOTrainer._compute_loss`: num_items_in_batch / processes x accumulation / steps)."""
    if normalisation == "token":
        return rows / process_rows * accumulation
    if normalisation == "global":
        return rows / process_rows * total_tokens * accumulation / (tokens * processes * steps)
    raise ValueError(f"batch_aggregation='mini_batch' takes a token mean, which {normalisation!r} losses are not.")
