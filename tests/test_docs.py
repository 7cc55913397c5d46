"""The documentation: the config reference is current, the docs build with no broken link, and the README, the
front page, links into them."""

import os
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


# A fenced block, with the reason it is not run when it is not: an HTML comment on the line before it.
BLOCK = re.compile(r"(?:<!-- not run: (?P<why>[^\n]*?) -->\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)```", re.DOTALL)
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def code_blocks(language: str) -> list:
    """(page, block) of every block in `language` that README.md and docs/ do not mark as not run."""
    found = []
    for page in PAGES:
        for block in BLOCK.finditer(page.read_text()):
            if block["lang"] == language and block["why"] is None:
                found.append(pytest.param(block["body"], id=f"{page.name}:{block['body'].splitlines()[0][:40]}"))
    return found


def test_every_code_block_runs_or_says_why_not():
    marked = [b for page in PAGES for b in BLOCK.finditer(page.read_text()) if b["lang"] in ("python", "bash")]
    assert all(b["why"] is None or len(b["why"]) > 20 for b in marked), [b["why"] for b in marked]
    assert {b["lang"] for page in PAGES for b in BLOCK.finditer(page.read_text())} <= {"python", "bash", "yaml", ""}
    assert len(code_blocks("python")) >= 3 and len(code_blocks("bash")) >= 4


def shortened(command: str) -> str:
    """A command as written, shortened only by its step count: 2 steps, or as many as its checkpoint needs."""
    if not command.startswith("trl-bapo"):
        return command
    saved = re.search(r"--save_steps (\d+)", command)
    resumed = re.search(r"--resume_from_checkpoint \S+-(\d+)", command)
    steps = int(saved[1]) if saved else int(resumed[1]) + 1 if resumed else 2
    if "--max_steps" in command:
        return re.sub(r"--max_steps \d+", f"--max_steps {steps}", command)
    return f"{command} --max_steps {steps}"


def in_a_scratch_folder(tmp_path: Path) -> dict:
    """A user's working folder with the recipes beside it, and the environment's scripts (`trl-bapo`) on PATH."""
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize("block", code_blocks("python"))
def test_python_blocks_run_as_written(tmp_path, block):
    """Each Python block of README.md and docs/, as a script, shortened only by its step count."""
    script = tmp_path / "example.py"
    script.write_text(re.sub(r"max_steps=\d+,", "max_steps=2,", block))
    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=in_a_scratch_folder(tmp_path), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("block", code_blocks("bash"))
def test_shell_blocks_run_as_written(tmp_path, block):
    """Each shell block of README.md and docs/, command by command, shortened only by its step count."""
    environment = in_a_scratch_folder(tmp_path)
    for command in block.replace("\\\n", " ").splitlines():
        command = re.sub(r"\s+#.*$", "", command).strip()
        if not command or command.startswith("#"):
            continue
        run = subprocess.run(
            ["bash", "-c", shortened(command)], cwd=tmp_path, env=environment, capture_output=True, text=True
        )
        assert run.returncode == 0, f"{shortened(command)}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
