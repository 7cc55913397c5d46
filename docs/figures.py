"""Writes every figure of README.md, docs/ and bench/ that comes from a run, from the run's results files, so that no
number of a run is typed by hand.

A figure is a span of a page between two HTML comments, `<!-- figure:NAME -->` and `<!-- /figure:NAME -->`, and
`FIGURES[NAME]` is the function that writes it from the repository root: it reads the results files (results.json,
sweep.json, overlap-*.json, the weights' manifest.json, and the RESULTS.md / DIFFICULTY.md the benchmark writes
beside a results.json, for what that one does not hold: the commit, the run's minutes, the difficulty table) and
returns the text, with the file, commit, machine and kernel path it comes from. A figure of one line sits inside a
sentence; one of several lines (a table) stands between blank lines.

    python docs/figures.py          # rewrite every span of every page
    python docs/figures.py --check  # exit 1 if a span is not what this would write

`tests/test_figures.py` runs the check. After a rerun of the benchmark, `python docs/figures.py` updates every figure.

To add a figure: write a function of the root that returns its text, decorate it with `@figure("a-name")`, and put
`<!-- figure:a-name --><!-- /figure:a-name -->` where it goes; `python docs/figures.py` fills it.
"""

from __future__ import annotations

import functools
import json
import math
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from trl_bapo.builtin.embedded import KERNEL_SETTINGS
from trl_bapo.examples.benchmark import completions_to_reach, mean_interval, median_curve, paired_difference, verdict

ROOT = Path(__file__).resolve().parents[1]
FIGURES: dict[str, Callable[[Path], str]] = {}
SPAN = re.compile(r"<!-- figure:(?P<name>[\w-]+) -->(?P<body>.*?)<!-- /figure:(?P=name) -->", re.DOTALL)
MANIFEST = "src/trl_bapo/builtin/weights/manifest.json"


def figure(name: str):
    """Registers a function of the repository root as the writer of the span `name`."""

    def register(function: Callable[[Path], str]) -> Callable[[Path], str]:
        if name in FIGURES:
            raise ValueError(f"Two figures are named {name!r}.")
        FIGURES[name] = function
        return function

    return register


def pages(root: Path = ROOT) -> list[Path]:
    """The pages that may hold figures: README.md, CHANGELOG.md, docs/*.md and bench/**/*.md, less the benchmark's
    scratch folders (`runs/`, ignored by git, written while a benchmark runs)."""
    bench = [page for page in (root / "bench").glob("**/*.md") if "runs" not in page.relative_to(root).parts]
    return sorted([root / "README.md", root / "CHANGELOG.md", *(root / "docs").glob("*.md"), *bench])


# Formats.


def num(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def signed(value: float, digits: int = 3) -> str:
    return f"{value:+.{digits}f}"


def share(value: float) -> str:
    return f"{value:.0%}"


def span_of(values: list[float], digits: int = 3) -> str:
    """'low-high', or the one value where they agree at these digits."""
    low, high = num(min(values), digits), num(max(values), digits)
    return low if low == high else f"{low}-{high}"


def count(value: float) -> str:
    return f"{value:,.0f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


# The results files.


class Run:
    """One benchmark output folder: its results.json, and from the RESULTS.md the benchmark wrote beside it the
    commit, the minutes and the machine line, which results.json does not hold (a `commit` key there wins)."""

    def __init__(self, root: Path, folder: str):
        self.folder = folder
        self.results = json.loads((root / folder / "results.json").read_text())
        report = root / folder / "RESULTS.md"
        header = report.read_text() if report.exists() else ""
        commit = re.search(r"; commit (\w+);", header)
        minutes = re.search(r"whole run ([\d.]+) min", header)
        self.commit = self.results.get("commit") or (commit[1] if commit else "not recorded")
        self.minutes = float(minutes[1]) if minutes else math.nan
        self.records = self.results["records"]
        self.methods = list(dict.fromkeys(r["method"] for r in self.records))

    @property
    def file(self) -> str:
        return f"{self.folder}/results.json"

    @property
    def path(self) -> dict:
        """The kernel path: results.json's model record, else the first run's, else empty (not recorded)."""
        return self.results.get("model") or self.records[0].get("kernel_path") or {}

    def kernel(self) -> str:
        """'AVX512 kernels (default settings), 1 thread', or that the run did not record it."""
        path = self.path
        if not path:
            return "kernel path not recorded"
        settings = ", ".join(f"{k}={path[k]}" for k in KERNEL_SETTINGS if k in path and k != "OMP_NUM_THREADS")
        threads = path.get("torch_threads", "?")
        return (
            f"{path.get('cpu_capability', '?')} kernels ({settings or 'default settings'}), {threads} "
            f"thread{'s' if threads != 1 else ''} per run"
        )

    def machine(self) -> str:
        path = self.path
        if not path:
            return "machine not recorded"
        return f"{path.get('processor', '?')} with {', '.join(path.get('cpu_flags', [])) or 'no flags recorded'}"

    def source(self) -> str:
        """Where a figure comes from: the file, the commit, the machine and the kernel path."""
        return f"{self.file}, commit {self.commit}, {self.machine()}, {self.kernel()}"

    def short(self) -> str:
        return f"{self.file}, commit {self.commit}"

    def of(self, method: str) -> list[dict]:
        return sorted((r for r in self.records if r["method"] == method), key=lambda r: r["seed"])

    def values(self, method: str, key: str) -> list[float]:
        return [r[key] for r in self.of(method)]

    def median(self, method: str, key: str) -> float:
        return statistics.median(self.values(method, key))

    def mean(self, method: str, key: str) -> float:
        return statistics.fmean(self.values(method, key))

    def base(self) -> float:
        return self.results["base"]["heldout"]

    def gain(self, method: str) -> float:
        """Mean over seeds of the final held-out mean@8 minus the base model's."""
        return self.mean(method, "eval_accuracy") - self.base()

    def paired(self, method: str, reference: str = "grpo") -> dict:
        return paired_difference(self.records, method, reference)

    def cell(self, method: str, key: str, digits: int = 3) -> str:
        """'median (min-max)'."""
        return f"{num(self.median(method, key), digits)} ({span_of(self.values(method, key), digits)})"

    def means(self, method: str, key: str) -> list[float]:
        """The BAPO metric `key`'s run means, seed by seed."""
        return [r["bapo_means"][key] for r in self.of(method)]


@functools.cache
def run(root: Path, folder: str) -> Run:
    return Run(root, folder)


def manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())


def built_on(entry: dict) -> str:
    where = entry["built_on"]
    threads = where["torch_threads"]
    return (
        f"built on {where['processor']} with {', '.join(where['cpu_flags'])}, {where['cpu_capability']} kernels, "
        f"{threads} thread{'s' if threads != 1 else ''}, torch {where['torch']}; the manifest records no commit"
    )


def difficulty_rows(root: Path) -> list[list[str]]:
    """The rows of the table bench/paper/DIFFICULTY.md holds (the benchmark writes it; no json holds its figures)."""
    text = (root / "bench/paper/DIFFICULTY.md").read_text()
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if re.match(r"\| [a-z]+ \| \d+ \|", line)
    ]


def mixed_share(root: Path, folder: str) -> str:
    """The expected share of mixed groups the benchmark's DIFFICULTY.md states for a folder's warm start."""
    text = (root / folder / "DIFFICULTY.md").read_text()
    return re.search(r"(\d+%) of groups of \d+ expected mixed", text)[1]


def paired_text(d: dict, digits: int = 3) -> str:
    return f"{signed(d['mean'], digits)} [{signed(d['low'], digits)}, {signed(d['high'], digits)}]"


def paired_words(d: dict, digits: int = 3) -> str:
    if d["seeds"] < 2:
        return f"{signed(d['mean'], digits)} (one seed, no interval)"
    return (
        f"{signed(d['mean'], digits)} (90% interval {signed(d['low'], digits)} to {signed(d['high'], digits)}), "
        f"a {verdict(d)}"
    )


# The shipped weights (manifest.json).

CARRY_DEFAULT = "tiny-carry-h128-l4-steps1500-seed0"
SHIPPED = {
    "arithmetic": "tiny-arithmetic-h128-l4-steps1500-seed0",
    "carry 400": "tiny-carry-h128-l4-steps400-seed0",
    "carry 700": "tiny-carry-h128-l4-steps700-seed0",
}


@figure("default-base")
def default_base(root: Path) -> str:
    entry = manifest(root)[CARRY_DEFAULT]
    accuracy = entry["base_heldout"]
    return (
        f"{num(accuracy['mean_at_8'])} (greedy {num(accuracy['greedy'])}; manifest.json, sha256 "
        f"`{entry['sha256'][:12]}`, {built_on(entry)})"
    )


@figure("shipped-candidates")
def shipped_candidates(root: Path) -> str:
    weights = manifest(root)
    base = {name: num(weights[model]["base_heldout"]["mean_at_8"]) for name, model in SHIPPED.items()}
    return (
        f"arithmetic 1500 steps: {base['arithmetic']}; carry 400 and 700 steps: {base['carry 400']} and "
        f"{base['carry 700']}; manifest.json"
    )


@figure("paper-candidates-built")
def paper_candidates_built(root: Path) -> str:
    rows = {f"{task} {steps}": base for task, steps, base, *_ in difficulty_rows(root)}
    return (
        f"arithmetic 1500 steps: {rows['arithmetic 1500']}; carry 400 and 700 steps: {rows['carry 400']} and "
        f"{rows['carry 700']}; bench/paper/DIFFICULTY.md, which records no commit"
    )


# The carry regime on the shipped weights (bench/, bench/avx2/), and the rerun of bench/overlap-target/.

CARRY = ("bench", "bench/avx2")


@figure("carry-runs")
def carry_runs(root: Path) -> str:
    default, avx2 = (run(root, folder) for folder in CARRY)
    return (
        f"the default path at commit {default.commit} ({default.file}, {num(default.minutes, 1)} minutes; "
        f"{default.kernel()}), the AVX2 kernels selected by settings at {avx2.commit} ({avx2.file}, "
        f"{num(avx2.minutes, 1)} minutes; {avx2.kernel()}), both on {default.machine()}"
    )


@figure("carry-base")
def carry_base(root: Path) -> str:
    default = run(root, "bench")
    return f"{num(default.base())} ({default.short()})"


@figure("carry-grpo-gain")
def carry_grpo_gain(root: Path) -> str:
    default = run(root, "bench")
    return f"{signed(default.gain('grpo'))}, mean over seeds, {default.short()}"


@figure("carry-paths")
def carry_paths(root: Path) -> str:
    rows = []
    for folder in CARRY:
        r = run(root, folder)
        gate = r.results["gate"]
        rows.append(
            [
                r.kernel(),
                r.commit,
                signed(r.gain("grpo")),
                signed(r.gain("bapo")),
                f"{paired_text(r.paired('bapo'))}, {verdict(r.paired('bapo'))}",
                f"{'passed' if gate['passed'] else 'failed'}: median gain {signed(gate['grpo_gain'])}, 3 x seed "
                f"spread {num(3 * gate['grpo_seed_stdev'])}",
                r.file,
            ]
        )
    header = ["kernel path", "commit", "GRPO gain (mean)", "BAPO gain (mean)", "BAPO - GRPO paired, 90% interval"]
    return table([*header, "gate", "results"], rows) + f"\n\nBoth on {run(root, 'bench').machine()}."


@figure("carry-methods")
def carry_methods(root: Path) -> str:
    r = run(root, "bench")
    rows = [
        [
            method.upper(),
            r.cell(method, "eval_accuracy"),
            count(r.median(method, "rollouts")),
            num(r.median(method, "unlock_rate")),
            num(r.median(method, "seconds_per_step")),
        ]
        for method in ("grpo", "dapo", "bapo")
    ]
    header = ["method (default path)", "held-out mean@8, median (min-max)", "completions", "unlock rate", "s / step"]
    return table(header, rows) + f"\n\nMedians over seeds; {r.source()}."


@figure("carry-by-seed")
def carry_by_seed(root: Path) -> str:
    rows = []
    for folder in CARRY:
        r = run(root, folder)
        gate = r.results["gate"]
        seeds = {m: ", ".join(num(v) for v in r.values(m, "eval_accuracy")) for m in ("grpo", "bapo")}
        d = r.paired("bapo")
        judged = (
            f"passed: median gain {signed(gate['grpo_gain'])} > 3 x {num(gate['grpo_seed_stdev'])}"
            if gate["passed"]
            else f"failed: median gain {signed(gate['grpo_gain'])} < 3 x {num(gate['grpo_seed_stdev'])}"
        )
        rows.append(
            [
                f"{r.kernel()}, commit {r.commit}",
                num(r.base()),
                seeds["grpo"],
                seeds["bapo"],
                signed(r.gain("grpo")),
                signed(r.gain("bapo")),
                f"{paired_text(d)}: {verdict(d)}",
                judged,
            ]
        )
    header = ["kernel path", "base mean@8", "GRPO by seed", "BAPO by seed", "GRPO mean gain", "BAPO mean gain"]
    header += ["BAPO - GRPO, paired (90% t-interval)", "gate"]
    return table(header, rows) + f"\n\nSeeds 0, 1, 2 in order; {CARRY[0]}/results.json and {CARRY[1]}/results.json."


@figure("carry-dapo")
def carry_dapo(root: Path) -> str:
    r = run(root, "bench")
    completions = r.median("dapo", "rollouts") / r.median("grpo", "rollouts")
    return (
        f"{', '.join(num(v) for v in r.values('dapo', 'eval_accuracy'))} ({num(completions, 1)} x GRPO's "
        f"completions), DAPO - GRPO {paired_text(r.paired('dapo'))}, a {verdict(r.paired('dapo'))} ({r.short()})"
    )


@figure("carry-time")
def carry_time(root: Path) -> str:
    parts = []
    for folder, name in zip(CARRY, ("default path", "AVX2")):
        r = run(root, folder)
        grpo, bapo = r.median("grpo", "seconds_per_step"), r.median("bapo", "seconds_per_step")
        parts.append(f"{num(grpo)} / {num(bapo)} s, {num(bapo / grpo, 2)} x ({name}, {r.short()})")
    return "; ".join(parts)


@figure("carry-gate-avx2")
def carry_gate_avx2(root: Path) -> str:
    r = run(root, "bench/avx2")
    gate = r.results["gate"]
    return (
        f"its median gain is {signed(gate['grpo_gain'])}, above the 0.05 floor, but its lowest seed "
        f"({num(min(r.values('grpo', 'eval_accuracy')))}) widens its spread to {num(gate['grpo_seed_stdev'])} "
        f"({r.short()})"
    )


@figure("carry-half-widths")
def carry_half_widths(root: Path) -> str:
    widths = [run(root, folder).paired("bapo")["half_width"] for folder in CARRY]
    gains = [run(root, folder).gain("grpo") for folder in CARRY]
    return f"half-widths {span_of(widths)} against GRPO gains of {span_of(gains)}"


@figure("carry-summary")
def carry_summary(root: Path) -> str:
    r = run(root, "bench")
    return (
        f"GRPO gains {signed(r.gain('grpo'))} (mean over seeds) and BAPO {signed(r.gain('bapo'))}: BAPO minus GRPO, "
        f"paired by seed, is {paired_words(r.paired('bapo'))} ({r.short()})"
    )


@figure("carry-summary-avx2")
def carry_summary_avx2(root: Path) -> str:
    r = run(root, "bench/avx2")
    return (
        f"GRPO gains {signed(r.gain('grpo'))} and BAPO {signed(r.gain('bapo'))}, paired "
        f"{paired_words(r.paired('bapo'))} ({r.short()}); the gate "
        f"{'passes' if run(root, 'bench').results['gate']['passed'] else 'fails'} on the default path and "
        f"{'passes' if r.results['gate']['passed'] else 'fails'} on this one" + _gate_reason(r.results["gate"])
    )


def _gate_reason(gate: dict) -> str:
    """Why the gate failed, in words: the gain below its floor, or the seeds' spread above a third of the gain."""
    if gate["passed"]:
        return ""
    if gate["grpo_gain"] < 0.05:
        return ", where GRPO's median gain is below the 0.05 floor"
    return ", where the spread of GRPO's seeds is more than a third of its median gain"


@figure("carry-zero-std")
def carry_zero_std(root: Path) -> str:
    r = run(root, "bench")
    return f"a median {share(r.median('grpo', 'zero_std_fraction'))} of GRPO's groups ({r.short()})"


@figure("carry-bapo-cost")
def carry_bapo_cost(root: Path) -> str:
    r = run(root, "bench")
    extra = r.median("bapo", "rollouts") / r.median("grpo", "rollouts") - 1
    time = r.median("bapo", "seconds_per_step") / r.median("grpo", "seconds_per_step")
    return f"{share(extra)} more completions (re-evaluation) at {num(time, 2)} x GRPO's time per step ({r.short()})"


@figure("carry-mixed")
def carry_mixed(root: Path) -> str:
    return f"{mixed_share(root, 'bench')} (bench/DIFFICULTY.md, commit {run(root, 'bench').commit})"


@figure("overlap-target-rerun")
def overlap_target_rerun(root: Path) -> str:
    again, first = run(root, "bench/overlap-target"), run(root, "bench")
    same = {
        method: sum(
            a["eval_accuracy"] == b["eval_accuracy"] for a, b in zip(again.of(method), first.of(method), strict=True)
        )
        for method in ("grpo", "bapo")
    }
    seeds = len(first.of("grpo"))
    return (
        f"{again.file} (commit {again.commit}, {again.kernel()}) trained GRPO and BAPO again on the default path "
        f"and got the held-out mean@8 of bench/results.json on {same['grpo']} of {seeds} GRPO seeds and "
        f"{same['bapo']} of {seeds} BAPO seeds"
    )


# The learning-rate sweeps: bench/earlier/sweep.json on the warm start built before the weights shipped (the rates
# the carry tables' runs used), bench/sweep.json on the shipped weights (the rates `make bench` takes next).


def sweep(root: Path, file: str = "bench/earlier/sweep.json") -> dict:
    return json.loads((root / file).read_text())


@figure("sweep-base")
def sweep_base(root: Path) -> str:
    return f"{num(sweep(root)['runs'][0]['base_eval_accuracy'])} (bench/earlier/sweep.json)"


@figure("sweep-table")
def sweep_table(root: Path) -> str:
    rows = [
        [
            r["method"],
            f"{r['learning_rate']:.0e}",
            num(r["eval_accuracy"]),
            f"{r['rollouts']:.0f}",
            num(r["seconds_per_step"]),
        ]
        for r in sweep(root)["runs"]
    ]
    return table(["method", "lr", "held-out mean@8", "completions", "s / step"], rows)


@figure("sweep-best")
def sweep_best(root: Path) -> str:
    return best_rates(sweep(root))


def best_rates(s: dict) -> str:
    rates = ", ".join(f"{m} {rate:.0e}" for m, rate in s["rates"].items())
    return f"{rates}; best loss option: {s['best_loss']}"


@figure("sweep-shipped-table")
def sweep_shipped_table(root: Path) -> str:
    s = sweep(root, "bench/sweep.json")
    machine = s["model"]
    rows = [
        [r["method"], f"{r['learning_rate']:.0e}", num(r["eval_accuracy"]), f"{r['rollouts']:.0f}"] for r in s["runs"]
    ]
    return (
        table(["method", "lr", "held-out mean@8", "completions"], rows)
        + f"\n\nBase held-out mean@8 {num(s['runs'][0]['base_eval_accuracy'])}; best rates: {best_rates(s)}. "
        f"bench/sweep.json, commit {s['commit']}, warm start {machine['model']}, {machine['cpu_capability']} kernels, "
        f"{machine['torch_threads']} thread per run."
    )


# The earlier carry run (bench/earlier: the results.json, RESULTS.md and DIFFICULTY.md of commit 449ac66, restored
# from git), on the warm start built on the machine that ran it.

EARLIER = "bench/earlier"
ABLATIONS = {
    "bapo_no_x2": "Without X2",
    "bapo_no_x3": "Without X3",
    "bapo_mini": "The mini-test variant",
    "bapo_v1": "With v = 1",
    "bapo_adaptive": "With adaptive clipping",
    "bapo_opmd": "With OPMD",
}


@figure("earlier-run")
def earlier_run(root: Path) -> str:
    r = run(root, EARLIER)
    return f"commit {r.commit}, {num(r.minutes, 1)} minutes, {len(r.records)} runs; {r.file}, {r.kernel()}"


@figure("bench-full-time")
def bench_full_time(root: Path) -> str:
    r = run(root, EARLIER)
    return f"{r.minutes:.0f} minutes at commit {r.commit}, the last full run ({EARLIER}/RESULTS.md)"


@figure("earlier-base")
def earlier_base(root: Path) -> str:
    r = run(root, EARLIER)
    return f"{num(r.base())} ({r.short()})"


@figure("earlier-methods")
def earlier_methods(root: Path) -> str:
    r = run(root, EARLIER)
    rows = [
        [
            method.upper(),
            r.cell(method, "eval_accuracy"),
            count(r.median(method, "rollouts")),
            num(r.median(method, "unlock_rate")),
            num(r.median(method, "seconds_per_step")),
            f"{r.median(method, 'peak_rss_mib'):.0f} MiB",
        ]
        for method in ("grpo", "dapo", "bapo")
    ]
    header = ["method", "held-out mean@8, median (min-max)", "completions", "unlock rate", "s / step", "peak RSS"]
    return table(header, rows) + f"\n\nMedians over seeds; {r.source()}."


@figure("earlier-gate")
def earlier_gate(root: Path) -> str:
    r = run(root, EARLIER)
    gate = r.results["gate"]
    return (
        f"from {num(r.base())} to {num(r.median('grpo', 'eval_accuracy'))}: a gain of {num(gate['grpo_gain'])} "
        f"(median over seeds), against a standard deviation of {num(gate['grpo_seed_stdev'])} across seeds "
        f"(3 x {num(gate['grpo_seed_stdev'])} = {num(3 * gate['grpo_seed_stdev'])}; {r.short()})"
    )


@figure("earlier-level")
def earlier_level(root: Path) -> str:
    r = run(root, EARLIER)
    below = r.median("grpo", "eval_accuracy") - r.median("bapo", "eval_accuracy")
    return (
        f"its median is {num(below)} below GRPO's, inside GRPO's seed range "
        f"({span_of(r.values('grpo', 'eval_accuracy'))}); its own seeds span "
        f"{span_of(r.values('bapo', 'eval_accuracy'))}"
    )


def earlier_reach(r: Run) -> dict:
    """Completions each method's median curve needs to reach BAPO's final median accuracy."""
    target = r.median("bapo", "eval_accuracy")
    return {m: completions_to_reach(median_curve(r.records, m), target) for m in ("grpo", "dapo", "bapo")}


@figure("earlier-reach")
def earlier_reach_figure(root: Path) -> str:
    r = run(root, EARLIER)
    reach = earlier_reach(r)
    return (
        f"BAPO reaches its final {num(r.median('bapo', 'eval_accuracy'))} with {count(reach['bapo'])} completions, "
        f"GRPO with {count(reach['grpo'])}, DAPO with {count(reach['dapo'])} (median curves, {r.short()}); DAPO "
        f"ends highest ({num(r.median('dapo', 'eval_accuracy'))}), at "
        f"{num(r.median('dapo', 'rollouts') / r.median('grpo', 'rollouts'), 1)} x GRPO's completions"
    )


@figure("earlier-ablations")
def earlier_ablations(root: Path) -> str:
    r = run(root, EARLIER)
    medians = {m: r.median(m, "eval_accuracy") for m in ABLATIONS}
    each = " ".join(f"{label}: {num(medians[m])}." for m, label in ABLATIONS.items())
    return f"Every BAPO ablation and loss option lands at {span_of(list(medians.values()))} (medians). {each}"


@figure("earlier-targets")
def earlier_targets(root: Path) -> str:
    r = run(root, EARLIER)
    base = r.base()
    grpo, dapo, bapo = ({k: r.median(m, k) for k in r.records[0] if k != "method"} for m in ("grpo", "dapo", "bapo"))
    gain = (bapo["eval_accuracy"] - base) / (grpo["eval_accuracy"] - base)
    reach = earlier_reach(r)
    needed = completions_to_reach(median_curve(r.records, "bapo"), dapo["eval_accuracy"])
    unlock = bapo["unlock_rate"] / grpo["unlock_rate"]
    time = bapo["seconds_per_step"] / grpo["seconds_per_step"]
    rows = [
        [
            "BAPO's gain >= 1.3 x GRPO's",
            f"{num(bapo['eval_accuracy'] - base)} / {num(grpo['eval_accuracy'] - base)} = {num(gain, 2)}",
            "met" if gain >= 1.3 else "missed",
        ],
        [
            "BAPO reaches DAPO's accuracy with <= 0.5 x DAPO's completions",
            f"{count(needed)} of {count(dapo['rollouts'])}"
            if math.isfinite(needed)
            else f"BAPO never reaches {num(dapo['eval_accuracy'])} in {r.records[0]['steps']} steps",
            "met" if needed <= 0.5 * dapo["rollouts"] else "missed",
        ],
        [
            "BAPO's unlock rate >= 1.5 x GRPO's",
            f"{num(bapo['unlock_rate'])} vs {num(grpo['unlock_rate'])} = {num(unlock, 2)}",
            "met" if unlock >= 1.5 else "missed",
        ],
        [
            "BAPO's relock rate below its unlock rate",
            f"{num(bapo['relock_rate'])} vs {num(bapo['unlock_rate'])}",
            "met" if bapo["relock_rate"] < bapo["unlock_rate"] else "missed",
        ],
        ["BAPO's s / step <= 1.15 x GRPO's", num(time, 2), "met" if time <= 1.15 else "missed"],
    ]
    turned = reach["bapo"] / reach["dapo"]
    return (
        table(["target", "measured (medians)", "verdict"], rows)
        + f"\n\nTurned around: DAPO needs {count(reach['dapo'])} completions to reach BAPO's final "
        f"{num(bapo['eval_accuracy'])}, which BAPO reaches with {count(reach['bapo'])}, or {num(turned, 2)} x. "
        f"From {r.source()}."
    )


@figure("earlier-mixed")
def earlier_mixed(root: Path) -> str:
    return f"{mixed_share(root, EARLIER)} ({EARLIER}/DIFFICULTY.md, commit {run(root, EARLIER).commit})"


@figure("earlier-zero-std")
def earlier_zero_std(root: Path) -> str:
    r = run(root, EARLIER)
    zero = r.median("grpo", "zero_std_fraction")
    return f"{share(zero)} of GRPO's groups have zero reward variance, so GRPO already trains on {share(1 - zero)}"


@figure("earlier-x2")
def earlier_x2(root: Path) -> str:
    r = run(root, EARLIER)
    bapo, grpo = r.median("bapo", "rollouts"), r.median("grpo", "rollouts")
    change = r.median("bapo_no_x2", "eval_accuracy") - r.median("bapo", "eval_accuracy")
    return (
        f"the {share(bapo / grpo - 1)} extra BAPO spends ({count(bapo)} vs {count(grpo)} completions); taking X2 "
        f"away changes accuracy by {signed(change)} (medians)"
    )


@figure("earlier-x3")
def earlier_x3(root: Path) -> str:
    r = run(root, EARLIER)
    change = r.median("bapo_no_x3", "eval_accuracy") - r.median("bapo", "eval_accuracy")
    return (
        f"the batch fill reaches {num(r.median('bapo', 'batch_fill'), 2)} of B with X3 and "
        f"{num(r.median('bapo_no_x3', 'batch_fill'), 2)} without; taking X3 away changes accuracy by "
        f"{signed(change)} (medians)"
    )


@figure("earlier-delay")
def earlier_delay(root: Path) -> str:
    r = run(root, EARLIER)
    return (
        f"v = 5 ends at {num(r.median('bapo', 'eval_accuracy'))} and v = 1 at "
        f"{num(r.median('bapo_v1', 'eval_accuracy'))} (medians)"
    )


@figure("earlier-unlock")
def earlier_unlock(root: Path) -> str:
    r = run(root, EARLIER)
    return (
        f"GRPO's unlock rate is {num(r.median('grpo', 'unlock_rate'))} and BAPO's "
        f"{num(r.median('bapo', 'unlock_rate'))} (medians)"
    )


@figure("earlier-costs")
def earlier_costs(root: Path) -> str:
    r = run(root, EARLIER)
    completions = r.median("bapo", "rollouts") / r.median("grpo", "rollouts") - 1
    time = r.median("bapo", "seconds_per_step") / r.median("grpo", "seconds_per_step")
    rss = r.median("bapo", "peak_rss_mib"), r.median("grpo", "peak_rss_mib")
    memory = f"{rss[0]:.0f} MiB against {rss[1]:.0f} MiB"
    return (
        f"{share(completions)} more completions, {num(time, 2)} x GRPO's time per step and "
        f"{share(rss[0] / rss[1] - 1)} more peak memory ({memory}; medians, {r.short()})"
    )


# The paper's regime (bench/paper/): outside its rule, on the warm start built before the weights shipped.

OUTSIDE, EXACT = "bench/paper/outside_rule", "bench/paper/authors_exact"
PAPER_METHODS = {
    "grpo": "GRPO",
    "dapo": "DAPO",
    "bapo": "BAPO (`behavior`)",
    "bapo_decoupled": "BAPO `decoupled`",
    "bapo_authors": "BAPO, the authors' settings",
}


@figure("paper-zero-share")
def paper_zero_share(root: Path) -> str:
    arithmetic = next(row for row in difficulty_rows(root) if row[0] == "arithmetic")
    return f"{share(float(arithmetic[3]))} of groups at zero variance (bench/paper/DIFFICULTY.md)"


@figure("paper-base")
def paper_base(root: Path) -> str:
    r = run(root, OUTSIDE)
    return f"{num(r.base())} ({r.short()})"


@figure("paper-shipped-base")
def paper_shipped_base(root: Path) -> str:
    return f"{num(manifest(root)[SHIPPED['arithmetic']]['base_heldout']['mean_at_8'])} (manifest.json)"


@figure("paper-paired")
def paper_paired(root: Path) -> str:
    exact, outside = run(root, EXACT), run(root, OUTSIDE)
    rows = []
    for r, method, label in (
        (exact, "bapo_authors", "BAPO, the authors' rules (`bapo_authors`)"),
        (outside, "bapo", "BAPO (`behavior`, eq. 3)"),
        (outside, "bapo_decoupled", "BAPO `decoupled`"),
        (outside, "dapo", "DAPO"),
    ):
        d = r.paired(method)
        rows.append(
            [
                label,
                signed(d["mean"], 4),
                f"[{signed(d['low'], 4)}, {signed(d['high'], 4)}]",
                verdict(d),
                num(r.median(method, "batch_fill_median"), 2),
                count(r.median(method, "rollouts")),
                r.short(),
            ]
        )
    header = ["method", "difference", "90% interval", "verdict", "batch fill", "completions", "results"]
    recorded = [f"{r.file}: {r.machine()}, {r.kernel()}" for r in (exact, outside) if r.path]
    return (
        table(header, rows)
        + "\n\n"
        + ("; ".join(recorded) or "Neither results.json records the machine or kernel path.")
    )


@figure("paper-final")
def paper_final(root: Path) -> str:
    r = run(root, OUTSIDE)
    return f"{num(r.base())}; GRPO ends at {num(r.median('grpo', 'eval_accuracy'))}, median, {r.short()}"


@figure("paper-effective")
def paper_effective(root: Path) -> str:
    r = run(root, EXACT)
    return (
        f"{num(r.median('bapo_authors', 'effective_rollout_ratio'), 2)} of its completions carry an advantage with "
        f"the authors' rules, {num(r.median('grpo', 'effective_rollout_ratio'), 2)} for GRPO ({r.short()})"
    )


@figure("paper-dapo-cost")
def paper_dapo_cost(root: Path) -> str:
    r = run(root, OUTSIDE)
    return f"{num(r.median('dapo', 'rollouts') / r.median('grpo', 'rollouts'), 1)} x GRPO's completions"


@figure("paper-half-widths")
def paper_half_widths(root: Path) -> str:
    widths = [run(root, OUTSIDE).paired(m)["half_width"] for m in ("bapo", "bapo_decoupled", "dapo")]
    widths.append(run(root, EXACT).paired("bapo_authors")["half_width"])
    return f"the paired half-widths here are {span_of(widths)}"


@figure("paper-rule")
def paper_rule(root: Path) -> str:
    rows = [
        [f"{task}, warm start {steps}", share_, base, gain, gate]
        for task, steps, base, share_, gain, _, gate in difficulty_rows(root)
    ]
    return (
        table(["candidate", "zero-variance share", "base mean@8", "GRPO gain", "gate"], rows)
        + "\n\nFrom bench/paper/DIFFICULTY.md, which the benchmark wrote; its GRPO runs' results file was not kept."
    )


@figure("paper-grpo-seed0")
def paper_grpo_seed0(root: Path) -> str:
    r = run(root, OUTSIDE)
    grpo = r.of("grpo")[0]
    curve = {step: value for step, _, value in grpo["heldout_curve"]}
    first, early, last = min(curve), min(curve, key=lambda step: abs(step - 100)), max(curve)
    return (
        f"at {grpo['learning_rate']:.0e} seed {grpo['seed']} goes from {num(curve[first])} to {num(curve[early])} at "
        f"step {early} and {num(curve[last])} at step {last} ({r.short()})"
    )


@figure("paper-grpo-behaviour")
def paper_grpo_behaviour(root: Path) -> str:
    r = run(root, OUTSIDE)
    zero = r.values("grpo", "zero_std_fraction")
    effective = r.values("grpo", "effective_rollout_ratio")
    greedy, relock, unlock = (
        span_of(r.values("grpo", k)) for k in ("eval_accuracy_greedy", "relock_rate", "unlock_rate")
    )
    return (
        f"{span_of([100 * z for z in zero], 0)}% of its groups stay at zero variance over the run, so "
        f"{span_of([100 * e for e in effective], 0)}% of its completions carry a gradient; greedy accuracy falls "
        f"too (from {num(r.results['base']['greedy'])} at the start to {greedy}); its relock rate is {relock} of "
        f"the tracked prompts solved at the start, its unlock rate {unlock} of those at 0/32 ({r.short()})"
    )


@figure("paper-methods")
def paper_methods(root: Path) -> str:
    r = run(root, OUTSIDE)
    rows = [["base", num(r.base()), "", "", "", "", ""]]
    for method, label in PAPER_METHODS.items():
        rows.append(
            [
                label,
                ", ".join(num(v) for v in r.values(method, "eval_accuracy")),
                num(r.median(method, "eval_accuracy")),
                count(r.median(method, "rollouts")),
                f"{num(r.median(method, 'unlock_rate'))} / {num(r.median(method, 'relock_rate'))}",
                num(r.median(method, "batch_fill_median"), 2),
                num(r.median(method, "seconds_per_step")),
            ]
        )
    header = ["method", "held-out mean@8, per seed", "median", "completions", "unlock / relock", "batch fill"]
    return (
        table([*header, "s / step"], rows) + f"\n\nSeeds 0-3 in order, medians over seeds; {r.source()}; the run's "
        "RESULTS.md records 2 torch threads, the merging process's."
    )


@figure("paper-paired-outside")
def paper_paired_outside(root: Path) -> str:
    r = run(root, OUTSIDE)
    rows = []
    for method in ("dapo", "bapo", "bapo_decoupled", "bapo_authors"):
        d = r.paired(method)
        rows.append(
            [
                PAPER_METHODS[method],
                signed(d["mean"], 4),
                f"[{signed(d['low'], 4)}, {signed(d['high'], 4)}]",
                verdict(d),
            ]
        )
    return table(["method", "difference", "90% interval", "verdict"], rows) + f"\n\n{r.short()}."


@figure("paper-dapo")
def paper_dapo(root: Path) -> str:
    r = run(root, OUTSIDE)
    above = sum(d > g for d, g in zip(r.values("dapo", "eval_accuracy"), r.values("grpo", "eval_accuracy")))
    widths = [r.paired(m)["half_width"] for m in ("bapo", "bapo_decoupled", "bapo_authors")]
    return (
        f"DAPO ends at {num(r.median('dapo', 'eval_accuracy'))} (base {num(r.base())}), above GRPO on {above} of "
        f"{len(r.of('dapo'))} seeds, at {num(r.median('dapo', 'rollouts') / r.median('grpo', 'rollouts'), 1)} x "
        f"GRPO's completions and {num(r.median('dapo', 'seconds_per_step') / r.median('grpo', 'seconds_per_step'), 1)}"
        f" x its time per step; the BAPO intervals' half-widths are {span_of(widths)} on {len(r.of('grpo'))} seeds"
    )


@figure("paper-targets")
def paper_targets(root: Path) -> str:
    r = run(root, OUTSIDE)
    variants = ("bapo", "bapo_decoupled", "bapo_authors")
    fill = {m: num(r.median(m, "batch_fill_median"), 2) for m in variants}
    time = {m: num(r.median(m, "seconds_per_step") / r.median("grpo", "seconds_per_step"), 2) for m in variants}
    unlock = [r.median(m, "unlock_rate") for m in variants]
    relock = [r.median(m, "relock_rate") for m in variants]
    dapo = r.median("dapo", "eval_accuracy")
    reached = [m for m in variants if math.isfinite(completions_to_reach(median_curve(r.records, m), dapo))]
    differences = [r.paired(m) for m in variants]
    rows = [
        [
            "batch fill >= 0.7",
            f"{fill['bapo']} (`behavior`), {fill['bapo_decoupled']} (`decoupled`), {fill['bapo_authors']} (authors)",
            "met" if max(r.median(m, "batch_fill_median") for m in variants) >= 0.7 else "missed",
        ],
        [
            "gain >= 1.3 x GRPO's, interval above 0",
            f"GRPO's gain is {signed(r.gain('grpo'))}; every difference is a "
            + ("tie" if all(verdict(d) == "tie" for d in differences) else "win or loss, see above"),
            "missed" if r.gain("grpo") <= 0 or not any(d["low"] > 0 for d in differences) else "see above",
        ],
        [
            "DAPO's accuracy at <= 0.5 x DAPO's completions",
            f"{'no BAPO variant' if not reached else ', '.join(reached)} reaches DAPO's {num(dapo)} after training "
            "begins",
            "missed" if not reached else "see RESULTS.md",
        ],
        [
            "unlock >= 1.5 x GRPO's, relock below unlock",
            f"unlock {span_of(unlock)} vs {num(r.median('grpo', 'unlock_rate'))}; relock {span_of(relock, 2)}",
            "met" if min(unlock) >= 1.5 * r.median("grpo", "unlock_rate") and max(relock) < min(unlock) else "missed",
        ],
        [
            "s/step <= 1.15 x GRPO's",
            f"{time['bapo']} (`behavior`), {time['bapo_decoupled']} (`decoupled`), {time['bapo_authors']} (authors)",
            "met" if max(float(t) for t in time.values()) <= 1.15 else "missed",
        ],
    ]
    return table(["target", "measured (BAPO's variants, medians)", "verdict"], rows) + f"\n\n{r.short()}."


@figure("paper-composition")
def paper_composition(root: Path) -> str:
    r = run(root, OUTSIDE)
    x1 = r.means("bapo", "bapo/x1") + r.means("bapo_decoupled", "bapo/x1")
    x2 = r.means("bapo", "bapo/x2") + r.means("bapo_decoupled", "bapo/x2")
    x3 = r.means("bapo", "bapo/x3") + r.means("bapo_decoupled", "bapo/x3")
    return (
        f"X1 {span_of(x1, 1)} groups a step ({share(statistics.fmean(x1) / 32)} of 32), X2 {span_of(x2, 1)}, X3 "
        f"{span_of(x3, 1)} (run means of `behavior` and `decoupled`, each seed; {r.short()})"
    )


@figure("paper-supply")
def paper_supply(root: Path) -> str:
    r = run(root, OUTSIDE)
    settings = {
        "bapo": "eq. 8's band (default)",
        "bapo_window_6": "B_high window 6 steps, eq. 8's band",
        "bapo_band_authors": "fixed band [1/8, 3/8] (the authors')",
        "bapo_band_wide": "fixed band [1/8, 7/8] (every mixed group)",
        "bapo_authors": "the authors' settings (their band, X2 rules, v = 2)",
    }
    rows = [
        [
            label,
            num(r.of(m)[0]["bapo_means"]["bapo/x3"], 1),
            num(r.of(m)[0]["batch_fill_median"], 2),
            num(r.of(m)[0]["eval_accuracy"]),
        ]
        for m, label in settings.items()
    ]
    grpo = num(r.of("grpo")[0]["eval_accuracy"])
    header = ["X3 setting (seed 0)", "X3 groups per step", "batch fill (median)", "held-out mean@8"]
    return table(header, rows) + f"\n\nGRPO on seed 0: {grpo}; {r.short()}."


@figure("paper-variants")
def paper_variants(root: Path) -> str:
    r = run(root, OUTSIDE)
    variants = ("bapo", "bapo_decoupled", "bapo_authors")
    losses = [-r.paired(m)["mean"] for m in variants]
    relock = [r.median(m, "relock_rate") for m in variants]
    return (
        f"lose {span_of(losses)} more than GRPO on average (ties), and their relock rises with them "
        f"({span_of(relock, 2)} against GRPO's {num(r.median('grpo', 'relock_rate'), 2)}; medians, {r.short()})"
    )


@figure("paper-unlock")
def paper_unlock(root: Path) -> str:
    outside, exact = run(root, OUTSIDE), run(root, EXACT)
    unlock = [outside.median(m, "unlock_rate") for m in ("bapo", "bapo_decoupled", "bapo_authors")]
    x2_paper = outside.means("bapo", "bapo/x2") + outside.means("bapo_decoupled", "bapo/x2")
    x2_authors = outside.means("bapo_authors", "bapo/x2") + exact.means("bapo_authors", "bapo/x2")
    return (
        f"{span_of(unlock, 2)} against {num(outside.median('grpo', 'unlock_rate'), 2)} of those at 0/32, and relocks "
        f"more; X2 brings back {span_of(x2_paper, 1)} groups a step under the paper's admission rule and "
        f"{span_of(x2_authors, 1)} under the authors' (run means per seed, {outside.file} and {exact.file})"
    )


@figure("paper-time")
def paper_time(root: Path) -> str:
    r = run(root, OUTSIDE)
    return f"{num(r.median('bapo', 'seconds_per_step') / r.median('grpo', 'seconds_per_step'), 2)} x ({r.short()})"


@figure("decoupled-vs-behavior")
def decoupled_vs_behavior(root: Path) -> str:
    r = run(root, OUTSIDE)
    return f"{paired_words(r.paired('bapo_decoupled', 'bapo'), 4)} ({r.short()})"


@figure("paper-clip")
def paper_clip(root: Path) -> str:
    r = run(root, OUTSIDE)
    decoupled = r.means("bapo_decoupled", "bapo/x1/clip_fraction")
    behavior = r.means("bapo", "bapo/x1/clip_fraction")
    lag = r.means("bapo", "bapo/x1/lag_mean")
    return (
        f"its x1 clip fraction is {span_of(decoupled)} against {span_of(behavior)} for `behavior`, whose mean lag "
        f"behind the policy is {span_of(lag, 1)} steps (run means per seed, {r.short()})"
    )


@figure("authors-run")
def authors_run(root: Path) -> str:
    r = run(root, EXACT)
    return (
        f"{len(r.records)} runs, {r.minutes:.0f} minutes of training summed over them, commit {r.commit}; {r.kernel()}"
    )


@figure("authors-commit")
def authors_commit(root: Path) -> str:
    return f"commit {run(root, EXACT).commit}"


@figure("authors-grpo")
def authors_grpo(root: Path) -> str:
    exact, outside = run(root, EXACT), run(root, OUTSIDE)
    a, b = exact.values("grpo", "eval_accuracy"), outside.values("grpo", "eval_accuracy")
    same = sum(x == y for x, y in zip(a, b, strict=True))
    return (
        f"GRPO's held-out mean@8 per seed: {', '.join(map(str, a))} in authors_exact/ and {', '.join(map(str, b))} "
        f"in outside_rule/, the same on {same} of {len(a)} seeds to every digit the two results.json files hold"
    )


@figure("authors-table")
def authors_table(root: Path) -> str:
    exact, outside = run(root, EXACT), run(root, OUTSIDE)
    rows = []
    for r, method, label, timed in (
        (exact, "grpo", "GRPO", True),
        (exact, "bapo_authors", "BAPO, the authors' rules (`bapo_authors`)", True),
        (outside, "bapo_authors", "BAPO, the earlier approximation (outside_rule)", False),
    ):
        rows.append(
            [
                label,
                ", ".join(num(v) for v in r.values(method, "eval_accuracy")),
                num(r.median(method, "eval_accuracy")),
                count(r.median(method, "rollouts")),
                num(r.median(method, "batch_fill_median"), 2),
                num(r.median(method, "effective_rollout_ratio"), 2),
                num(r.median(method, "seconds_per_step")) if timed else "",
            ]
        )
    header = ["method", "held-out mean@8, per seed", "median", "completions", "batch fill (median)"]
    return table([*header, "effective rollouts", "s / step"], rows) + f"\n\n{exact.source()}; {outside.short()}."


@figure("authors-paired")
def authors_paired(root: Path) -> str:
    exact, outside = run(root, EXACT), run(root, OUTSIDE)
    return (
        f"`bapo_authors` {paired_words(exact.paired('bapo_authors'), 4)}; the approximation was "
        f"{paired_words(outside.paired('bapo_authors'), 4)}"
    )


@figure("authors-means")
def authors_means(root: Path) -> str:
    r = run(root, EXACT)
    first = r.of("bapo_authors")[0]
    means = first["bapo_means"]
    fallback = sum(step["bapo/x1"] >= 32 for step in first["composition"])
    time = r.median("bapo_authors", "seconds_per_step") / r.median("grpo", "seconds_per_step")
    return (
        f"seed {first['seed']}, means per rollout step: X1 {num(means['bapo/x1'], 1)} groups, X2 "
        f"{num(means['bapo/x2'], 2)}, X3 {num(means['bapo/x3'], 1)} (fill {num(means['bapo/batch_fill'], 2)}); the "
        f"store holds {means['bapo/difficult_buffer']:.0f} difficult entries on average and "
        f"{means['bapo/high_quality_buffer']:.0f} high-quality ones; re-evaluation takes "
        f"{num(means['bapo/reevaluated'], 1)} prompts a step on average; the mini-batch aggregation takes "
        f"{num(means['bapo/optimizer_steps'], 1)} optimizer steps a rollout step; the X1 fallback (all 32 groups) "
        f"fired on {fallback} of {len(first['composition'])} rollout steps; s/step {num(time, 2)} x GRPO's in the "
        f"same run ({r.short()})"
    )


# Overlapped rollout (`make bench-overlap`: bench/overlap-*.json).

OVERLAP_ROWS = {
    "server-lora": "vLLM CPU server on core 0, trainer on core 1, LoRA adapter by file",
    "server": "vLLM CPU server on core 0, trainer on core 1, full weights",
    "hf": "transformers' generate, embedded default (1M parameters)",
    "hf-wide": "transformers' generate, 25M parameters (random weights)",
}


def overlap_results(root: Path) -> dict[str, dict]:
    """Each engine's bench/overlap-ENGINE.json with its summary (as OVERLAP.md's), in `OVERLAP_ROWS`' order."""
    from trl_bapo.examples.overlap_bench import engine_results

    results = engine_results(root / "bench")
    return {name: results[name] for name in OVERLAP_ROWS if name in results}


@figure("overlap-steps")
def overlap_steps(root: Path) -> str:
    from trl_bapo.examples.overlap_bench import _transfer

    rows, sources = [], []
    for name, result in overlap_results(root).items():
        s = result["summary"]
        rows.append(
            [
                OVERLAP_ROWS[name],
                num(s["sync_seconds_per_step"]),
                num(s["overlap_seconds_per_step"]),
                f"**{num(s['ratio'], 2)}**",
                num(s["ideal_ratio"], 2),
                num(s["sync_generation_per_step"]),
                num(s["overlap_wait_per_step"]),
                f"{num(s['sync_rest_per_step'])} / {num(s['overlap_rest_per_step'])}",
                _transfer(name, s),
            ]
        )
        path = result["kernel_path"]
        sources.append(
            f"bench/overlap-{name}.json: commit {result.get('commit', 'not recorded')}, {result['cpu']}, "
            f"{path['cpu_capability']} kernels, {result['threads']} trainer thread(s), {result['steps']} steps"
        )
    header = ["engine", "s/step without", "s/step with", "ratio", "bound", "generation s/step"]
    header += ["waited with overlap", "rest of a step, without / with", "weights to the engine per refresh"]
    return table(header, rows) + "\n\n" + "; ".join(sources) + "."


def seconds(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:.0f} s"


def target_rows(summary: dict) -> list[list[str]]:
    rows = []
    for row in summary["rows"]:
        methods = ("grpo", "bapo", "bapo_overlap")
        rows.append(
            [
                str(row["seed"]),
                num(row["target"]),
                *(seconds(row.get(m, math.nan)) for m in methods),
                " / ".join(num(row.get(f"{m}_seconds_per_step", math.nan)) for m in methods),
            ]
        )
    return rows


TARGET_HEADER = ["seed", "GRPO's final mean@8", "GRPO", "BAPO", "BAPO with overlap", "s/step GRPO / BAPO / overlap"]


@figure("overlap-target-hf")
def overlap_target_hf(root: Path) -> str:
    summary = json.loads((root / "bench" / "overlap-target.json").read_text())
    source = run(root, "bench/overlap-target")
    return table(TARGET_HEADER, target_rows(summary)) + f"\n\nbench/overlap-target.json, from {source.source()}."


def paired_seconds(summary: dict, method: str, reference: str) -> str:
    """`method`'s seconds to the target minus `reference`'s, seed by seed: the mean and its 90% t-interval, where
    both reached it on every seed."""
    pairs = [(row[method], row[reference]) for row in summary["rows"]]
    if any(math.isinf(a) or math.isinf(b) for a, b in pairs):
        missed = [str(row["seed"]) for row in summary["rows"] if math.isinf(row[method]) or math.isinf(row[reference])]
        return f"not computed: the target was not reached on seed {', '.join(missed)}"
    d = mean_interval([a - b for a, b in pairs])
    if d["seeds"] < 2:
        return f"{d['mean']:+.0f} s (one seed, no interval)"
    word = "faster" if d["high"] < 0 else "slower" if d["low"] > 0 else "a tie"
    return f"{d['mean']:+.0f} s, 90% interval [{d['low']:+.0f}, {d['high']:+.0f}]: {word}"


def heldout_pairs(r: Run) -> list[tuple[float, float]]:
    """BAPO's and BAPO with overlap's held-out mean@8 at each evaluation of each seed."""
    return [
        (a[2], b[2])
        for sync, overlapped in zip(r.of("bapo"), r.of("bapo_overlap"), strict=True)
        for a, b in zip(sync["heldout_curve"], overlapped["heldout_curve"], strict=True)
    ]


@figure("overlap-target-server")
def overlap_target_server(root: Path) -> str:
    from trl_bapo.examples.overlap_bench import gate_words

    summary = json.loads((root / "bench" / "overlap-target-server.json").read_text())
    rule = (
        "The setting is the first of the candidates in `SERVER_CANDIDATES` (trl_bapo/examples/overlap_bench.py) on "
        "which GRPO alone passes the gate (gain >= 0.05 over the base and > 3 x its seed deviation): "
        f"{gate_words(summary['candidates'])}."
    )
    if not summary["chosen"]:
        return f"{rule} GRPO passed on none, so BAPO was not compared; bench/overlap-target-server.json, commit " + (
            f"{summary['commit']}, {summary['cpu']}."
        )
    if not summary["rows"]:
        return (
            f"{rule} The table, GRPO again with BAPO and BAPO with overlap interleaved by seed on that setting, has "
            f"not run yet; bench/overlap-target-server.json, commit {summary['commit']}, {summary['cpu']}."
        )
    r = run(root, f"bench/overlap-target-server/{summary['chosen']}")
    accuracy = {m: paired_words(r.paired(m), 3) for m in ("bapo", "bapo_overlap")}
    overlap_vs_bapo = paired_words(r.paired("bapo_overlap", "bapo"), 3)
    points = heldout_pairs(r)
    alike = sum(a == b for a, b in points)
    return (
        table(TARGET_HEADER, target_rows(summary))
        + "\n\n"
        + f"{rule} In the table's own runs, GRPO's gain {signed(summary['gate']['grpo_gain'])}, deviation "
        f"{num(summary['gate']['grpo_seed_stdev'])} over the base held-out mean@8 "
        f"{num(r.results['base']['heldout'])}. Paired by seed, seconds to the target: "
        f"BAPO - GRPO {paired_seconds(summary, 'bapo', 'grpo')}; BAPO with overlap - BAPO "
        f"{paired_seconds(summary, 'bapo_overlap', 'bapo')}. Final held-out mean@8 against GRPO's: BAPO "
        f"{accuracy['bapo']}; BAPO with overlap {accuracy['bapo_overlap']}; BAPO with overlap against BAPO "
        f"{overlap_vs_bapo}; BAPO with overlap scored BAPO's held-out mean@8 at {alike} of {len(points)} evaluations "
        "(every 25 steps, all seeds). The s/step columns count the evaluations; the three methods ran interleaved by "
        f"seed, GRPO again after its rule runs. LoRA r = {summary['lora']['r']}, "
        f"lr {summary['learning_rate']:.0e}, {summary['steps']} steps of {summary['candidates'][-1]['prompts']} "
        f"prompts; {r.source()}, {summary['cpu']}.\n\n"
        "![held-out accuracy against training wall seconds, server with LoRA](images/overlap_target_server.png)"
    )


@figure("overlap-target-server-earlier")
def overlap_target_server_earlier(root: Path) -> str:
    """The comparison made before the rule (LoRA r = 8, lr 2e-3), on a GRPO that then failed its gate."""
    r = run(root, "bench/earlier/overlap-target-server")
    points = heldout_pairs(r)
    faster = sum(
        o["seconds_per_step"] < s["seconds_per_step"] for s, o in zip(r.of("bapo"), r.of("bapo_overlap"), strict=True)
    )
    return (
        f"BAPO with overlap scored BAPO's held-out mean@8 at {sum(a == b for a, b in points)} of {len(points)} "
        f"evaluations, with fewer seconds per step on {faster} of {len(r.of('bapo'))} seeds ({r.short()})"
    )


# Writing and checking the pages.


def render(name: str, root: Path = ROOT) -> str:
    """A span's body as the page holds it: inline for one line, between blank lines for a block."""
    text = FIGURES[name](root)
    return f"\n\n{text}\n\n" if "\n" in text else text


def rewrite(text: str, root: Path = ROOT) -> str:
    """The page with every span written anew."""
    return SPAN.sub(
        lambda m: f"<!-- figure:{m['name']} -->{render(m['name'], root)}<!-- /figure:{m['name']} -->", text
    )


def spans(text: str) -> list[str]:
    return [m["name"] for m in SPAN.finditer(text)]


# Plots the pages show from docs/images, copied from where the benchmarks write them (page: source).
IMAGES = {"docs/images/overlap_target_server.png": "bench/overlap_target_server.png"}


def stale_images(root: Path = ROOT) -> list[tuple[Path, Path]]:
    """(page image, source) where the page's copy differs from its source, or is missing."""
    pairs = [(root / page, root / source) for page, source in IMAGES.items() if (root / source).exists()]
    return [(page, source) for page, source in pairs if not page.exists() or page.read_bytes() != source.read_bytes()]


def main(argv: list[str]) -> int:
    stale = []
    for page, source in stale_images():
        stale.append(page)
        if "--check" not in argv:
            page.write_bytes(source.read_bytes())
    for page in pages():
        text = page.read_text()
        unknown = [name for name in spans(text) if name not in FIGURES]
        if unknown:
            print(f"{page}: spans with no figure: {unknown}")
            return 1
        new = rewrite(text)
        if new != text:
            stale.append(page)
            if "--check" not in argv:
                page.write_text(new)
    if "--check" in argv and stale:
        print(f"out of date: {[str(p.relative_to(ROOT)) for p in stale]}: run `python docs/figures.py`.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
