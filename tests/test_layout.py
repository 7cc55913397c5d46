"""The layout's rules: the library never imports its showcase, and every private part of TRL it touches exists."""

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import trl
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer
from trl.generation.vllm_generation import VLLMGeneration

from trl_bapo import trl_private

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "trl_bapo"
SHOWCASE = "trl_bapo.examples"


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` in `path` names, relative imports resolved."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def library_modules() -> list[Path]:
    return [path for path in sorted(PACKAGE.rglob("*.py")) if "examples" not in path.relative_to(PACKAGE).parts]


def test_no_library_module_imports_the_showcase():
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(name for name in imported_modules(path) if name.startswith(SHOWCASE))
        for path in library_modules()
    }
    assert not {path: names for path, names in offenders.items() if names}


def test_the_script_runs_without_the_showcase():
    """Imported as `trl-bapo` imports it, the library loads no module of the showcase."""
    code = (
        "import sys, trl_bapo, trl_bapo.cli, trl_bapo.scripts.bapo; "
        f"print(sorted(m for m in sys.modules if m.startswith({SHOWCASE!r})))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_every_private_part_of_trl_that_bapo_touches_exists(tiny_model_path, tmp_path):
    trainer = GRPOTrainer(
        model=tiny_model_path,
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], num_generations=2, max_steps=1),
        train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 4}),
    )
    missing = [f"GRPOTrainer.{name}" for name in trl_private.TRAINER_METHODS if not hasattr(GRPOTrainer, name)]
    missing += [f"GRPOTrainer().{name}" for name in trl_private.TRAINER_ATTRIBUTES if not hasattr(trainer, name)]
    missing += [
        f"GRPOTrainer()._dist.{name}" for name in trl_private.DIST_ATTRIBUTES if not hasattr(trainer._dist, name)
    ]
    # Set only with vLLM, which this environment lacks: TRL's constructor must still set it.
    source = inspect.getsource(GRPOTrainer.__init__)
    missing += [
        f"GRPOTrainer().{name}" for name in trl_private.VLLM_TRAINER_ATTRIBUTES if f"self.{name} =" not in source
    ]
    missing += [
        f"VLLMGeneration.{name}" for name in trl_private.VLLM_GENERATION_METHODS if not hasattr(VLLMGeneration, name)
    ]
    assert not missing, f"trl {trl.__version__} lacks what trl_bapo.trl_private names: {missing}"
    assert trl.__version__ == trl_private.TRL_VERSION
