"""Every figure of a run in README.md, CHANGELOG.md, docs/ and bench/ is written from its results file by
`docs/figures.py`: each span holds what its function writes now, each span names a figure, and each figure is used."""

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIGURES = runpy.run_path(str(ROOT / "docs" / "figures.py"))
PAGES = FIGURES["pages"](ROOT)


def used() -> dict[str, list[str]]:
    """Each figure name, and the pages that hold a span of it."""
    found: dict[str, list[str]] = {}
    for page in PAGES:
        for name in FIGURES["spans"](page.read_text()):
            found.setdefault(name, []).append(str(page.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_figure_is_what_its_results_file_gives(page):
    text = page.read_text()
    assert text == FIGURES["rewrite"](text, ROOT), f"{page.relative_to(ROOT)}: run `python docs/figures.py`"


def test_every_span_names_a_figure_and_every_figure_is_on_a_page():
    spans = used()
    assert not set(spans) - set(FIGURES["FIGURES"]), (
        f"spans with no figure: {sorted(set(spans) - set(FIGURES['FIGURES']))}"
    )
    assert not set(FIGURES["FIGURES"]) - set(spans), (
        f"figures on no page: {sorted(set(FIGURES['FIGURES']) - set(spans))}"
    )


def test_a_span_is_closed_once_and_not_nested():
    for page in PAGES:
        text = page.read_text()
        opened, closed = text.count("<!-- figure:"), text.count("<!-- /figure:")
        assert opened == closed == len(FIGURES["spans"](text)), page.relative_to(ROOT)


def test_a_figure_follows_its_results_file(tmp_path):
    """A rerun changes the figure: the same renderer on a copy of bench/ with one GRPO seed moved."""
    import json
    import shutil

    for folder in ("bench", "src/trl_bapo/builtin/weights"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    results = json.loads((tmp_path / "bench/results.json").read_text())
    next(r for r in results["records"] if r["method"] == "grpo")["eval_accuracy"] += 0.1
    (tmp_path / "bench/results.json").write_text(json.dumps(results))
    figure = FIGURES["FIGURES"]["carry-grpo-gain"]
    assert figure(tmp_path) != figure(ROOT)


def test_the_check_passes():
    assert FIGURES["main"](["--check"]) == 0


def test_the_plots_pages_show_are_their_benchmarks_own(tmp_path):
    assert not FIGURES["stale_images"](ROOT), "run `python docs/figures.py`"
    # A copy that differs from its source, or a missing one, is stale.
    for page, source in FIGURES["IMAGES"].items():
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / source).write_bytes(b"plot")
        assert FIGURES["stale_images"](tmp_path) == [(tmp_path / page, tmp_path / source)]
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / page).write_bytes(b"plot")
        assert FIGURES["stale_images"](tmp_path) == []
