"""Evaluation helpers: per-prompt accuracy on the tiny model, unlock/relock rates, and the library's bins and
migration."""

from transformers import AutoTokenizer

from trl_bapo.builtin.tiny import load_tiny_model
from trl_bapo.examples.evaluation import prompt_accuracies, relock_rate, unlock_rate
from trl_bapo.tracking import accuracy_bins, migration_counts


def test_prompt_accuracies_sample_and_greedy(tiny_model_path):
    model, tokenizer = load_tiny_model(tiny_model_path), AutoTokenizer.from_pretrained(tiny_model_path)
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(5)]
    calls = []

    def ends_with_eos_reward(prompts, completions, answer, **kwargs):
        calls.append(len(completions))
        return [float(len(c) % 2) for c in completions]

    sampled = prompt_accuracies(model, tokenizer, rows, ends_with_eos_reward, num_samples=8, max_new_tokens=4)
    greedy = prompt_accuracies(model, tokenizer, rows, ends_with_eos_reward, greedy=True, max_new_tokens=4)
    assert calls == [40, 5]
    assert all(a * 8 == round(a * 8) for a in sampled) and all(a in (0.0, 1.0) for a in greedy)
    assert greedy == prompt_accuracies(model, tokenizer, rows, ends_with_eos_reward, greedy=True, max_new_tokens=4)


def test_bins_rates_and_migration():
    before = [0, 0, 0.125, 0.5, 1.0]
    after = [0.25, 0, 0, 0.5, 1.0]
    assert accuracy_bins(before, 8) == [2, 1, 0, 0, 1, 0, 0, 0, 1]
    assert unlock_rate(before, after) == 0.5  # one of the two 0/8 prompts reached 2/8
    assert relock_rate(before, after) == 1 / 3  # one of the three solved prompts fell to 0/8
    matrix = migration_counts(before, after, 8)
    assert matrix[0][2] == 1 and matrix[0][0] == 1 and matrix[1][0] == 1 and matrix[8][8] == 1
    assert sum(map(sum, matrix)) == len(before)
