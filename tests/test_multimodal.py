"""Image prompts (the Geometry3K path) on a tiny LLaVA-style VLM built from a config: images and their
processor fields survive B_bad re-evaluation and B_high replay."""

import math

import pytest
import torch
from conftest import bapo_logs, make_config
from datasets import Dataset
from PIL import Image
from tiny_vlm import build_tiny_vlm
from transformers import AutoProcessor

from trl_bapo import BAPOTrainer

COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20), (20, 230, 230), (230, 20, 230)]
# k correct out of 4 per prompt, before global step 2 and from then on (so re-evaluation can find improvement).
PLAN = {f"{t}{name}=": ks for t in range(6) for name, ks in zip("abcd", [(2, 2), (3, 3), (0, 2), (0, 0)])}


def _text(prompt) -> str:
    return next(part["text"] for part in prompt[0]["content"] if part["type"] == "text")


def _colour(text: str) -> tuple[int, int, int]:
    return COLOURS[(int(text[0]) * 4 + "abcd".index(text[1])) % len(COLOURS)]


def reward(prompts, completions, trainer_state, **kwargs):
    seen, rewards = {}, []
    for prompt in prompts:
        text = _text(prompt)
        rewards.append(float(seen.get(text, 0) < PLAN[text][int(trainer_state.global_step >= 2)]))
        seen[text] = seen.get(text, 0) + 1
    return rewards


@pytest.fixture(scope="module")
def tiny_vlm_path(tmp_path_factory) -> str:
    return str(build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "model"))


def test_images_survive_reevaluation_and_replay(tiny_vlm_path, tmp_path):
    rows = [
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
            "image": Image.new("RGB", (28, 28), _colour(text)),
        }
        for text in PLAN
    ]
    args = make_config(
        tmp_path,
        max_steps=5,
        rollout_delay=2,
        reevaluation_interval=2,
        beta=0.01,
        high_quality_lower_range=[0.5, 0.5],
        high_quality_upper_range=[0.75, 0.75],
    )
    trainer = BAPOTrainer(model=tiny_vlm_path, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows))
    processor = AutoProcessor.from_pretrained(tiny_vlm_path)
    expected_pixels = {
        text: processor.image_processor(images=Image.new("RGB", (28, 28), _colour(text)), return_tensors="pt")[
            "pixel_values"
        ][0]
        for text in PLAN
    }
    checked_rows = []
    compute_loss = trainer.compute_loss

    def checking_compute_loss(model, inputs, *a, **k):
        # Each row's image (one per prompt) must still be the image of that row's prompt.
        assert inputs["pixel_values"].shape[0] == sum(inputs["num_images"]) == len(inputs["prompt_ids"])
        for row in range(len(inputs["prompt_ids"])):
            if inputs["completion_mask"][row].sum() == 0:
                continue
            prompt = processor.tokenizer.decode(inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()])
            text = prompt.split("<image>")[-1].split("a:")[0]  # "u:<image>...<image>0a=a:"
            torch.testing.assert_close(inputs["pixel_values"][row], expected_pixels[text])
            checked_rows.append((trainer.state.global_step + 1, text))
        return compute_loss(model, inputs, *a, **k)

    trainer.compute_loss = checking_compute_loss
    trainer.train()

    logs = bapo_logs(trainer)
    assert sum(log["bapo/x2"] for log in logs) > 0, "no re-evaluated image prompt joined the batch"
    assert sum(log["bapo/x3"] for log in logs) > 0, "no image group was replayed"
    replayed = [(step, text) for step, text in checked_rows if int(text[0]) + 1 < step]
    assert any(text[1] == "c" for _, text in replayed), "re-evaluated rows were not checked"
    assert any(text[1] in "ab" for _, text in replayed), "replayed rows were not checked"
    assert all(math.isfinite(log["grad_norm"]) for log in logs)


def test_prompts_that_share_their_text_stay_two_in_b_bad(tiny_vlm_path, tmp_path):
    """Two problems with the same text over different images (Geometry3K's "Find x.") are two prompts of B_bad,
    and re-evaluation generates for each with its own image."""
    red, blue = (230, 20, 20), (20, 20, 230)

    def row(text, colour):
        return {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
            "image": Image.new("RGB", (28, 28), colour),
        }

    rows = [row("7x=", red), row("7x=", blue), row("1a=", red), row("2a=", blue)]
    reevaluated = []

    def shared_text_is_hard(prompts, completions, image, trainer_state, **kwargs):
        texts = [_text(prompt) for prompt in prompts]
        if trainer_state.global_step == 1 and set(texts) == {"7x="}:
            reevaluated.extend(picture.getpixel((0, 0)) for picture in image)
        seen, rewards = {}, []
        for text in texts:
            rewards.append(float(text != "7x=" and seen.get(text, 0) < 2))
            seen[text] = seen.get(text, 0) + 1
        return rewards

    args = make_config(tmp_path, max_steps=2, rollout_delay=2, reevaluation_interval=2)
    trainer = BAPOTrainer(
        model=tiny_vlm_path, reward_funcs=shared_text_is_hard, args=args, train_dataset=Dataset.from_list(rows)
    )
    trainer.train()

    held = [group.example for group in trainer._bapo.buffers.difficult_entries()]
    assert [_text(example["prompt"]) for example in held] == ["7x=", "7x="]
    assert {example["image"].getpixel((0, 0)) for example in held} == {red, blue}
    assert set(reevaluated) == {red, blue} and bapo_logs(trainer)[1]["bapo/reevaluated"] == 2
