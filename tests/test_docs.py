"""The documentation: the config reference is current, the docs build with no broken link, and the README, the
front page, links into them."""

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_the_config_reference_is_current():
    render = runpy.run_path(str(DOCS / "config_reference.py"))["render"]
    assert (DOCS / "config.md").read_text() == render(), "run `python docs/config_reference.py`"


def test_the_config_reference_lists_every_field():
    from dataclasses import fields

    from trl import GRPOConfig

    from trl_bapo import BAPOConfig

    page = (DOCS / "config.md").read_text()
    bapo = {f.name for f in fields(BAPOConfig)} - {f.name for f in fields(GRPOConfig)} | {"loss_type"}
    listed = set(re.findall(r"^\| `([a-z_0-9]+)` \|", page, flags=re.MULTILINE))
    assert listed == bapo


def test_the_docs_build_strict_with_no_broken_link(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "site" / "metrics" / "index.html").exists()


def test_the_readme_links_into_every_page_of_the_docs():
    readme = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"\]\((docs/[^)#]+)", readme))
    pages = {f"docs/{page.name}" for page in DOCS.glob("*.md")}
    assert pages <= linked, f"pages the README does not link: {sorted(pages - linked)}"
    missing = sorted(link for link in linked if not (ROOT / link).exists())
    assert not missing, missing


@pytest.mark.parametrize(
    "page, heading, steps, output_dir",
    [("docs/index.md", "Quick start", 300, "bapo-tiny"), ("README.md", "Use it like GRPOTrainer", 100, "bapo")],
)
def test_the_python_examples_run_as_written(tmp_path, page, heading, steps, output_dir):
    """The quick start and the README's example, shortened only by their step count."""
    text = (ROOT / page).read_text()
    block = re.search(rf"## {heading}\n\n```python\n(.*?)```", text, flags=re.DOTALL).group(1)
    assert f"max_steps={steps}," in block
    script = tmp_path / "example.py"
    script.write_text(block.replace(f"max_steps={steps},", "max_steps=2,"))
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / output_dir).is_dir()
