"""A tiny vision-language model for the image tests (LLaVA layout: a CLIP vision tower on the tiny Qwen2 language
model), built by code."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from trl_bapo.builtin.tiny import build_tokenizer, text_config

IMAGE_TOKEN = "<image>"
# Chat template of the tiny VLM: "u:<image>2+3=a:" for a user turn with an image, then the assistant's answer.
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'][0] }}:{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}<eos>{% endif %}{% endfor %}{% if add_generation_prompt %}a:{% endif %}"
)


def build_tiny_vlm(path: str | Path, seed: int = 0) -> Path:
    """Writes a tiny LLaVA-style VLM (28x28 images, 4 image tokens) and its processor to `path`.

    LLaVA's processor needs only PIL; Qwen2-VL's also builds a video processor that needs torchvision, which
    cannot be installed beside the CPU build of torch this project pins."""
    path = Path(path)
    if path.is_dir():
        return path
    tokenizer = build_tokenizer([IMAGE_TOKEN])
    tokenizer.chat_template = VLM_CHAT_TEMPLATE
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=VLM_CHAT_TEMPLATE,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        text_config=text_config(tokenizer, hidden_size=64, layers=2),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
