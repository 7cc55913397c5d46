"""The layout's rules: the library never imports its showcase, and every private part of TRL it touches exists."""

import ast
import importlib
import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import transformers
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
    # Set only with vLLM (and `llm` only in colocate mode), which this environment lacks: TRL's code must still set
    # them.
    missing += [
        f"GRPOTrainer().{name}" for name in trl_private.VLLM_TRAINER_ATTRIBUTES if name not in set_on_self(GRPOTrainer)
    ]
    missing += [
        f"VLLMGeneration().{name}"
        for name in trl_private.VLLM_GENERATION_ATTRIBUTES
        if name not in set_on_self(VLLMGeneration)
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
    classes define, that TRL's trainer also has, named in the code or in a constant of names it reads from the
    trainer; and every private name it imports from trl."""
    used, in_classes, imported = set(), set(), set()
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        module_used, _, module_in_classes, module_imported = private_names(tree)
        attributes = TRLAttributes(tree)
        used |= module_used | {name for name in attributes.trainer | attributes.generation if private(name)}
        in_classes, imported = in_classes | module_in_classes, imported | module_imported
    found = {name for name in used | in_classes if trl_owns(name)} | imported
    listed = {
        *trl_private.TRAINER_METHODS,
        *trl_private.TRAINER_ATTRIBUTES,
        *trl_private.VLLM_TRAINER_ATTRIBUTES,
        *trl_private.VLLM_GENERATION_METHODS,
        *trl_private.TRAINER_CLASS_ATTRIBUTES,
        *(name for names in trl_private.FUNCTIONS.values() for name in names),
    }
    listed = {name for name in listed if private(name)}  # the public ones: the test of attributes below
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


# How the library names the objects TRL built: a trainer (or the view of one an engine call runs on), and TRL's vLLM
# generation. `self` is one of them inside a class deriving from theirs; `<anything>.trainer` is the trainer a helper
# of BAPO holds, `<anything>.generation` or `.vllm_generation` a vLLM generation.
TRAINER_NAMES = {"trainer", "seeded", "view"}
GENERATION_NAMES = {"generation", "vllm_generation"}
TRAINER_CLASSES = {"GRPOTrainer", "BAPOTrainer"}
GENERATION_CLASSES = {"VLLMGeneration"}


def set_on_self(cls: type) -> set[str]:
    """The attributes a class's own code sets on its instances (`self.x = ...`, also in tuples and `+=`)."""
    return {
        node.attr
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(cls))))
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    }


def string_constants(tree: ast.Module) -> dict[str, set[str]]:
    """The module's constants that hold names: `NAME = ("a", "b")` (a tuple, list or set of strings, or a dict's
    string keys)."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            items = node.value.keys if isinstance(node.value, ast.Dict) else getattr(node.value, "elts", [])
            strings = {item.value for item in items if isinstance(item, ast.Constant) and isinstance(item.value, str)}
            if strings:
                found[node.targets[0].id] = strings
    return found


class TRLAttributes(ast.NodeVisitor):
    """The attribute names a module reads or writes on a trainer and on TRL's vLLM generation: `trainer.x`,
    `getattr(trainer, "x")`, and `getattr(trainer, name)` for each name of a module constant a loop walks."""

    def __init__(self, tree: ast.Module):
        self.trainer: set[str] = set()
        self.generation: set[str] = set()
        self._self: set[str] | None = None  # what `self` is in the class being read
        self._constants = string_constants(tree)
        self._loops = {}  # loop variable -> the module constants it walks
        for node in ast.walk(tree):
            for loop in getattr(node, "generators", []) + ([node] if isinstance(node, ast.For) else []):
                if isinstance(loop.target, ast.Name) and isinstance(loop.iter, ast.Name):
                    self._loops.setdefault(loop.target.id, set()).add(loop.iter.id)
        self.visit(tree)

    def owner(self, node: ast.expr) -> set[str] | None:
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        if name == "self" and isinstance(node, ast.Name):
            return self._self
        if name in TRAINER_NAMES:
            return self.trainer
        return self.generation if name in GENERATION_NAMES else None

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        outer, bases = self._self, {base.id for base in node.bases if isinstance(base, ast.Name)}
        self._self = None
        if bases & TRAINER_CLASSES:
            self._self = self.trainer
        elif bases & GENERATION_CLASSES:
            self._self = self.generation
            # The methods it defines that TRL's generation has are TRL's, overridden.
            self.generation.update(item.name for item in node.body if isinstance(item, ast.FunctionDef))
        self.generic_visit(node)
        self._self = outer

    def visit_Attribute(self, node: ast.Attribute) -> None:
        owner = self.owner(node.value)
        if owner is not None:
            owner.add(node.attr)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        accessors = ("getattr", "setattr", "hasattr", "delattr")
        if isinstance(node.func, ast.Name) and node.func.id in accessors and len(node.args) >= 2:
            owner, name = self.owner(node.args[0]), node.args[1]
            if owner is not None and isinstance(name, ast.Constant):
                owner.add(name.value)
            elif owner is not None and isinstance(name, ast.Name):
                for constant in self._loops.get(name.id, ()):
                    owner.update(self._constants.get(constant, ()))
        self.generic_visit(node)


def trl_attributes_to_list() -> tuple[set[str], set[str]]:
    """What `trl_private` must name, by its rule: on the trainer, what GRPOTrainer (or TRL's BaseTrainer) sets beyond
    its constructor's arguments kept under their names, and what transformers' Trainer sets privately; on TRL's vLLM
    generation, everything (TRL builds it for itself)."""
    grpo = set().union(*(set_on_self(cls) for cls in GRPOTrainer.__mro__ if cls.__module__.startswith("trl.")))
    trainer = set_on_self(transformers.Trainer)
    arguments = set(inspect.signature(GRPOTrainer.__init__).parameters)
    documented = {name for name in trainer if not private(name)} | (arguments & grpo)
    generation = set_on_self(VLLMGeneration) | set(dir(VLLMGeneration))
    on_trainer, on_generation = set(), set()
    for path in library_modules():
        found = TRLAttributes(ast.parse(path.read_text()))
        on_trainer |= {name for name in found.trainer if name in grpo or (name in trainer and private(name))}
        on_generation |= found.generation & generation
    return on_trainer - documented, on_generation


def test_trl_private_lists_every_attribute_of_trl_objects_the_code_uses():
    """Every attribute of TRL's trainer or vLLM generation the library reads or writes that TRL does not document is
    listed in `trl_private` (its docstring states the rule), found by reading the code; and each listed one is used."""
    on_trainer, on_generation = trl_attributes_to_list()
    listed_trainer = {*trl_private.TRAINER_ATTRIBUTES, *trl_private.VLLM_TRAINER_ATTRIBUTES}
    listed_generation = {*trl_private.VLLM_GENERATION_ATTRIBUTES, *trl_private.VLLM_GENERATION_METHODS}
    unlisted = sorted(f"trainer.{name}" for name in on_trainer - listed_trainer)
    unlisted += sorted(f"vllm_generation.{name}" for name in on_generation - listed_generation)
    assert not unlisted, f"attributes of TRL's objects used but not listed in trl_bapo.trl_private: {unlisted}"
    unused = sorted(listed_trainer - on_trainer) + sorted(listed_generation - on_generation)
    assert not unused, f"listed in trl_bapo.trl_private but no longer used: {unused}"
