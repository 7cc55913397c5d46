"""docs/from-grpo.md stays true to what it is written from: its cost table to bench/costs.json, its list of refusals
and warnings to the messages in src/trl_bapo, and its two recipes to the parsers of `trl grpo` and `trl-bapo`."""

from __future__ import annotations

import ast
import json
import re
import statistics
from pathlib import Path

import transformers
import yaml
from trl import DatasetMixtureConfig, GRPOConfig, ModelConfig, TrlParser
from trl.scripts.grpo import GRPOScriptArguments

from trl_bapo.examples.cost_bench import BEGIN, END, RESULTS, cost_table
from trl_bapo.scripts.bapo import make_parser

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "from-grpo.md"
PACKAGE = ROOT / "src" / "trl_bapo"
# A quoted fragment must be at least this long, so that it names one message or a few, not any.
SHORTEST_FRAGMENT = 12
# A message whose literal text has no piece this long only carries another message (`RuntimeError("; ".join(...))`,
# the script's `SystemExit(f"{type(error).__name__}: {error}")`): the page lists the message it carries.
SHORTEST_PIECE = 12
# Messages the page leaves out, each by a fragment of it and why: none reaches a user.
NOT_LISTED = {
    "division by zero": "the countdown verifier's parser, caught there: the completion scores 0",
    "value out of bounds": "the countdown verifier's parser, caught there",
    "trailing input": "the countdown verifier's parser, caught there",
    "unexpected end": "the countdown verifier's parser, caught there",
    "expected a number, got": "the countdown verifier's parser, caught there",
    "is not an unused source number": "the countdown verifier's parser, caught there",
    "nested too deeply": "the countdown verifier's parser, caught there",
    "unclosed parenthesis": "the countdown verifier's parser, caught there",
    "Unknown online filter": "BAPOConfig refuses an unknown online_filter first ('must be one of')",
    "Unknown difficult_admission": "BAPOConfig refuses an unknown difficult_admission first ('must be one of')",
}
PLACEHOLDER = "\x00"


def literal_text(node: ast.expr) -> str | None:
    """The text of a message as written, each formatted value a placeholder; None when it is not written out."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(part.value if isinstance(part, ast.Constant) else PLACEHOLDER for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = literal_text(node.left), literal_text(node.right)
        return None if left is None and right is None else (left or PLACEHOLDER) + (right or PLACEHOLDER)
    return None


def messages() -> dict[str, str]:
    """Every refusal (a raised error or SystemExit with its message written out) and every warning (`logger.warning`,
    `warnings.warn`) of the library, by where it is: `file:line` -> its text, placeholders for the values."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "examples" in path.relative_to(PACKAGE).parts:  # the showcase prints, it does not refuse
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
                name, argument = ast.unparse(node.exc.func), node.exc.args[0]
                if not (name.endswith("Error") or name == "SystemExit"):
                    continue
            elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("logger.warning", "warnings.warn"):
                name, argument = ast.unparse(node.func), node.args[0]
            else:
                continue
            text = literal_text(argument)
            if text is None:
                continue
            if name == "logger.warning":
                text = re.sub(r"%[sdr]", PLACEHOLDER, text)
            if max(len(piece) for piece in text.split(PLACEHOLDER)) >= SHORTEST_PIECE:
                found[f"{path.relative_to(PACKAGE)}:{node.lineno}"] = text
    return found


def section(text: str, begin: str, end: str) -> str:
    return text.split(begin, 1)[1].split(end, 1)[0]


def fragments() -> list[str]:
    """The quoted fragments of the page's refusals: the backticked spans of each table row's first cell."""
    rows = section(PAGE.read_text(), "<!-- refusals:begin -->", "<!-- refusals:end -->").splitlines()
    cells = [row.split(" | ")[0] for row in rows if row.startswith("| ") and not row.startswith("| the message")]
    return [fragment for cell in cells for fragment in re.findall(r"`([^`]+)`", cell)]


def test_the_cost_table_is_written_from_bench_costs_json():
    table = cost_table(json.loads(RESULTS.read_text()))
    assert section(PAGE.read_text(), BEGIN, END).strip() == table, (
        "run `python -m trl_bapo.examples.cost_bench --render`"
    )


def test_the_costs_json_records_where_it_ran():
    results = json.loads(RESULTS.read_text())
    assert {"commit", "machine", "runs"} <= set(results)
    assert {"cpu_capability", "torch_threads", "cpu_flags", "cores"} <= set(results["machine"])
    assert {(run["model"], run["trainer"]) for run in results["runs"]} == {
        (model, trainer) for model in ("embedded", "smollm2") for trainer in ("grpo", "bapo")
    }
    for run in results["runs"]:
        if run["trainer"] == "bapo":  # alpha is a host copy of the trainable weights (v = 5)
            assert run["alpha_host_bytes"] == run["trainable_bytes"] > 0
            assert run["bapo_state_bytes"] > run["alpha_host_bytes"]
        assert run["prompts_per_rollout"] >= 8


def test_every_refusal_and_warning_has_a_row_and_every_row_a_message():
    found = messages()
    quoted = fragments()
    short = [fragment for fragment in quoted if len(fragment) < SHORTEST_FRAGMENT]
    assert not short, f"fragments too short to name a message: {short}"
    stale = [fragment for fragment in quoted if not any(fragment in text for text in found.values())]
    assert not stale, f"the page quotes words no message in src/trl_bapo has: {stale}"
    unlisted = {
        where: text.replace(PLACEHOLDER, "{}")
        for where, text in found.items()
        if not any(fragment in text for fragment in quoted) and not any(key in text for key in NOT_LISTED)
    }
    assert not unlisted, f"messages docs/from-grpo.md does not list: {json.dumps(unlisted, indent=1)}"
    gone = [key for key in NOT_LISTED if not any(key in text for text in found.values())]
    assert not gone, f"NOT_LISTED names messages the code no longer has: {gone}"


def test_the_message_reader_finds_raises_and_warnings():
    assert any("cannot work with so few prompts" in text for text in messages().values())  # warnings.warn
    assert any("is ignored with" in text for text in messages().values())  # logger.warning, %-formatted
    assert any("trl-bapo: unknown key" in text for text in messages().values())  # SystemExit


def recipes() -> tuple[dict, dict]:
    blocks = re.findall(r"```yaml\n(.*?)```", PAGE.read_text(), re.DOTALL)
    assert len(blocks) == 2
    return yaml.safe_load(blocks[0]), yaml.safe_load(blocks[1])


def parse(parser, recipe: dict, tmp_path: Path) -> list:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return parser.parse_args_and_config(["--config", str(path)])


def test_the_bapo_recipe_keeps_the_grpo_recipe_and_both_parse(tmp_path, monkeypatch):
    # The recipes set bf16, which TrainingArguments refuses without a bf16 GPU: parsed as a GPU machine would.
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    grpo, bapo = recipes()
    changed = {key for key in grpo if bapo.get(key) != grpo[key]}
    assert changed == {"output_dir"}, changed
    grpo_parser = TrlParser((GRPOScriptArguments, GRPOConfig, ModelConfig, DatasetMixtureConfig))
    _, grpo_args, _, _ = parse(grpo_parser, grpo, tmp_path)
    _, bapo_args, _, _ = parse(make_parser(), bapo, tmp_path)
    added = set(bapo) - set(grpo)
    assert added and not added & {f.name for f in GRPOConfig.__dataclass_fields__.values()}
    assert grpo_args.generation_batch_size // grpo_args.num_generations == 32
    assert bapo_args.generation_batch_size // bapo_args.num_generations == 32
    assert (bapo_args.rollout_delay, bapo_args.reevaluation_interval) == (5, 5)


def medians(results_file: str, field: str) -> dict[str, float]:
    """Each method's median of `field` over its seeds in a benchmark results file."""
    by_method: dict[str, list[float]] = {}
    for record in json.loads((ROOT / results_file).read_text())["records"]:
        by_method.setdefault(record["method"], []).append(record[field])
    return {method: statistics.median(values) for method, values in by_method.items()}


def test_the_figures_about_v_and_m_are_their_results_files():
    """The page's sentences on what the bench measured about v and m, against the files they name."""
    text = " ".join(PAGE.read_text().split())
    accuracy = medians("bench/earlier/results.json", "eval_accuracy")
    completions = medians("bench/earlier/results.json", "rollouts")
    assert f"medians {accuracy['bapo_v1']:.3f} and {accuracy['bapo']:.3f}" in text
    assert (
        f"{accuracy['bapo_no_x2']:.3f} against {accuracy['bapo']:.3f}, with {completions['bapo_no_x2']:,.0f} "
        f"completions against {completions['bapo']:,.0f}"
    ) in text
    rollouts, seconds = medians("bench/results.json", "rollouts"), medians("bench/results.json", "seconds_per_step")
    assert (
        f"BAPO generated {rollouts['bapo']:,.0f} completions to GRPO's {rollouts['grpo']:,.0f} in 300 steps, "
        f"{rollouts['bapo'] / rollouts['grpo']:.2f} x"
    ) in text
    assert f"at {seconds['bapo'] / seconds['grpo']:.2f} x GRPO's seconds per step" in text
