"""A tiny Qwen2-architecture model and a character-level tokenizer, built by code (nothing is downloaded).

Tests and the demo run on it. `build_tiny_model` writes a model directory that TRL loads by path, like any
hub model, so the same code path (including a frozen reference model built from the path) is exercised.
An optional supervised warm start on a task gives the model a spread of difficulty to learn from.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
CHARACTERS = list("0123456789+-*/()=?,.: ") + [chr(c) for c in range(ord("a"), ord("z") + 1)]
# Conversational prompts render as their bare text ("47+5=" for one user message saying "47+5="), so a dataset in
# TRL's conversational format, and rewards that read chat completions, work on the tiny model as plain text does.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% if message['role'] == 'assistant' %}<eos>{% endif %}"
    "{% endfor %}"
)


def build_tokenizer(extra_special_tokens: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + list(extra_special_tokens) + CHARACTERS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        chat_template=CHAT_TEMPLATE,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=list(extra_special_tokens),
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, hidden_size: int = 64, layers: int = 2, heads: int = 4
) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(text_config(tokenizer, hidden_size, layers, heads))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def text_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int, layers: int, heads: int = 4) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def warm_start(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    pairs: Sequence[tuple[str, str]],
    steps: int,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 3e-3,
) -> None:
    """Supervised fine-tuning on (prompt, answer) pairs, loss on the answer and the end-of-sequence token."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    model.train()
    for _ in range(steps):
        batch = [rng.choice(pairs) for _ in range(batch_size)]
        prompts = [tokenizer(p)["input_ids"] for p, _ in batch]
        answers = [tokenizer(a)["input_ids"] + [tokenizer.eos_token_id] for _, a in batch]
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        input_ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, (p, a) in enumerate(zip(prompts, answers)):
            sequence = p + a
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            labels[row, len(p) : len(sequence)] = torch.tensor(a)
            attention_mask[row, : len(sequence)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    model.eval()


def build_tiny_model(
    path: str | Path,
    seed: int = 0,
    warm_start_pairs: Sequence[tuple[str, str]] = (),
    warm_start_steps: int = 0,
    heads: int = 4,
    hidden_size: int = 64,
    layers: int = 2,
) -> Path:
    """Writes the tiny model and tokenizer to `path` (reused when already there) and returns the path. vLLM's CPU
    attention takes head dimensions of 32 and more: `heads=2` gives that with the 64 hidden units."""
    path = Path(path)
    if path.is_dir():
        return path
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed, hidden_size=hidden_size, layers=layers, heads=heads)
    if warm_start_steps:
        warm_start(model, tokenizer, warm_start_pairs, warm_start_steps, seed=seed)
    # Written aside and renamed, so an interrupted build never leaves a half model to be reused.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent if path.parent.exists() else None))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, path)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process finished the same build first
    return path


def load_tiny_model(path: str | Path) -> Qwen2ForCausalLM:
    return AutoModelForCausalLM.from_pretrained(path)
