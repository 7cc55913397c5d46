"""The layout's rules: the library never imports its showcase, and every private part of TRL it touches exists."""

import ast
import importlib
import inspect
import re
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
    missing += [
        f"GRPOTrainer.{name}" for name in trl_private.TRAINER_CLASS_ATTRIBUTES if not hasattr(GRPOTrainer, name)
    ]
    missing += [
        f"{module}.{name}"
        for module, names in trl_private.FUNCTIONS.items()
        for name in names
        if not hasattr(importlib.import_module(module), name)
    ]
    assert not missing, f"trl {trl.__version__} lacks what trl_bapo.trl_private names: {missing}"
    assert trl.__version__ == trl_private.TRL_VERSION


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_names(tree: ast.AST) -> tuple[set[str], set[str], set[str], set[str]]:
    """In a module: the private attribute names it reads or writes; the private names it defines itself (functions,
    class attributes, `obj._x = ...`); those of them a class body defines (methods and class attributes: possible
    overrides); and the private names it imports from trl or transformers."""
    used, defined, in_classes, imported = set(), set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            used.add(node.attr)
            if isinstance(node.ctx, ast.Store):
                defined.add(node.attr)
        elif isinstance(node, ast.FunctionDef) and private(node.name):
            defined.add(node.name)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    in_classes.add(item.name)
                targets = item.targets if isinstance(item, ast.Assign) else [getattr(item, "target", None)]
                in_classes |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("trl", "transformers"):
            imported |= {alias.name for alias in node.names if private(alias.name)}
    in_classes = {name for name in in_classes if private(name)}
    return used, defined | in_classes, in_classes, imported


def trl_owns(name: str) -> bool:
    """Whether `name` is an attribute of TRL's trainer (or of transformers' Trainer, or of TRL's vLLM generation):
    on the class, or set on the instance by their code."""
    import transformers.trainer
    import trl.trainer.base_trainer
    import trl.trainer.grpo_trainer

    modules = (
        trl.trainer.grpo_trainer,
        trl.trainer.base_trainer,
        transformers.trainer,
        inspect.getmodule(VLLMGeneration),
    )
    pattern = re.compile(rf"self\.{name}\b")
    return hasattr(GRPOTrainer, name) or any(pattern.search(inspect.getsource(module)) for module in modules)


def test_trl_private_lists_every_private_name_the_code_uses():
    """Every private name of TRL (or transformers) the library reads, writes, overrides or imports is listed in
    `trl_private`, found by reading the code: every private attribute name it uses, and every private name its
    classes define, that TRL's trainer also has; and every private name it imports from trl."""
    used, in_classes, imported = set(), set(), set()
    for path in sorted(PACKAGE.rglob("*.py")):
        module_used, _, module_in_classes, module_imported = private_names(ast.parse(path.read_text()))
        used, in_classes, imported = used | module_used, in_classes | module_in_classes, imported | module_imported
    found = {name for name in used | in_classes if trl_owns(name)} | imported
    listed = {
        *trl_private.TRAINER_METHODS,
        *trl_private.TRAINER_ATTRIBUTES,
        *trl_private.VLLM_TRAINER_ATTRIBUTES,
        *trl_private.VLLM_GENERATION_METHODS,
        *trl_private.TRAINER_CLASS_ATTRIBUTES,
        *(name for names in trl_private.FUNCTIONS.values() for name in names),
    }
    assert found - listed == set(), (
        f"private names of TRL used but not listed in trl_bapo.trl_private: {found - listed}"
    )
    assert listed - found == set(), f"listed in trl_bapo.trl_private but no longer used: {listed - found}"


def modules_naming(name: str) -> set[str]:
    """The library modules (outside the showcase) whose code names `name`: calls it, reads it as an attribute or
    defines it."""
    found = set()
    for path in library_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            named = (
                (isinstance(node, ast.Name) and node.id == name)
                or (isinstance(node, ast.Attribute) and node.attr == name)
                or (isinstance(node, ast.FunctionDef) and node.name == name)
            )
            if named:
                found.add(path.name)
                break
    return found


def test_each_rule_of_algorithm_1_has_one_owner():
    """Line 8's entry rule, eq. 6's admission and c1 are decided by the buffers alone (selection.py defines the
    masks, buffers.py is the one module applying them; the state builds the buffers from the config and reports their
    c1); beta's meaning is decided in kl.py alone."""
    for rule in ("difficult_mask", "reevaluation_admitted"):
        assert modules_naming(rule) == {"selection.py", "buffers.py"}, rule
    for part in ("improved_mask", "beats_mask"):  # parts of `reevaluation_admitted`
        assert modules_naming(part) == {"selection.py"}, part
    assert modules_naming("difficult_threshold") == {"config.py", "state.py"}
    holders = {path.name for path in library_modules() if re.search(r"\.c1\b", path.read_text())}
    assert holders == {"buffers.py", "state.py"}  # `.c1`: the buffers' own, and the state's report of it
    assert modules_naming("kl_reference") == {"config.py", "kl.py"}
    assert modules_naming("behavior_kl") <= {"kl.py", "behavior.py", "trainer.py"}
