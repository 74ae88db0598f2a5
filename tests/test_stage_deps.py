"""Every stage's `deps` in dvc.yaml cover the code it runs, so `dvc repro` cannot call a stage
"up to date" after a change that alters its output.

For each stage (a `foreach` stage expanded into one stage per item) the entry file named in `cmd`
(`python stages/<x>.py ...`) and the transitive closure of the `finedefics.*` modules it imports
must be covered by the stage's deps: the file itself or a folder above it. Imports are read with
`ast` anywhere in a file (the stages import inside `main()`); `from finedefics.pkg import name`
counts `pkg/name.py` when `name` is a submodule, and every package's `__init__.py` on the way
counts. Package data a covered module reads through `Path(__file__)...  / "dir" / "file"` (the
FOCI reference sets, the FineR attribute lists) must be covered too.
"""

import ast
import copy
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO

PACKAGE = "finedefics"
ENTRY = re.compile(r"\bpython3?\s+(stages/\S+\.py)\b")
VAR = re.compile(r"\$\{\s*([^}]+?)\s*\}")


def _lookup(name: str, scope: dict):
    node = scope
    for part in name.split("."):
        node = node[part]
    return node


def _substitute(value, scope: dict):
    """DVC's `${...}` interpolation: a whole-string reference keeps the value's type."""
    if isinstance(value, dict):
        return {_substitute(k, scope): _substitute(v, scope) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, scope) for v in value]
    if not isinstance(value, str):
        return value
    whole = VAR.fullmatch(value.strip())
    if whole:
        return _lookup(whole.group(1), scope)
    return VAR.sub(lambda m: str(_lookup(m.group(1), scope)), value)


def expand_stages(dvc: dict, params: dict) -> dict[str, dict]:
    """Stage name (`name@key` for foreach stages) -> stage definition with `${...}` substituted."""
    stages = {}
    for name, stage in dvc["stages"].items():
        if "foreach" not in stage:
            stages[name] = _substitute(stage, params)
            continue
        items = _substitute(stage["foreach"], params)
        pairs = items.items() if isinstance(items, dict) else ((item, item) for item in items)
        for key, item in pairs:
            stages[f"{name}@{key}"] = _substitute(stage["do"], {**params, "key": key, "item": item})
    return stages


def _module_file(module: str, src: Path) -> Path | None:
    base = src.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _with_packages(module: str, src: Path) -> set[Path]:
    """The module's file and the `__init__.py` of every package on the way to it."""
    parts = module.split(".")
    files = {_module_file(".".join(parts[:i]), src) for i in range(1, len(parts) + 1)}
    return {f for f in files if f is not None}


def _imported_modules(tree: ast.AST, module: str | None, is_package: bool, src: Path) -> set[str]:
    """Names of the `finedefics.*` modules a file imports, anywhere in it (top level or in functions)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                if module is None:
                    continue
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if _module_file(f"{base}.{alias.name}", src))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            if getattr(func, "attr", getattr(func, "id", None)) == "import_module":
                found.add(str(node.args[0].value))
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def _file_base(node: ast.AST, file: Path) -> Path | None:
    """Evaluate `Path(__file__)`, `.resolve()`, `.parent`, `.parents[n]`; None for anything else."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Path" and len(node.args) == 1:
        return file if getattr(node.args[0], "id", None) == "__file__" else None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "resolve":
        return _file_base(node.func.value, file)
    if isinstance(node, ast.Attribute) and node.attr == "parent":
        base = _file_base(node.value, file)
        return base.parent if base else None
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "parents":
        base = _file_base(node.value.value, file)
        index = node.slice
        return base.parents[index.value] if base and isinstance(index, ast.Constant) else None
    return None


def _data_paths(tree: ast.AST, file: Path) -> set[Path]:
    """Package data a module reads: `Path(__file__)... / "a" / "b"` (the whole chain only)."""
    inner = {id(n.left) for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div)}
    paths = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.BinOp) or not isinstance(node.op, ast.Div) or id(node) in inner:
            continue
        names = []
        while isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            names.append(node.right)
            node = node.left
        base = _file_base(node, file)
        if base is None:
            continue
        for name in reversed(names):
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                break
            base = base / name.value
        if base != file:
            paths.add(base)
    return paths


def code_of(entry: Path, src: Path) -> set[Path]:
    """The entry file, every `finedefics` module file it imports transitively, and the package data they read."""
    seen: set[Path] = set()
    data: set[Path] = set()
    todo = [entry]
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        tree = ast.parse(file.read_text(), filename=str(file))
        module = None
        if file.is_relative_to(src):
            module = ".".join(file.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
            data |= _data_paths(tree, file)
        for name in _imported_modules(tree, module, file.name == "__init__.py", src):
            todo.extend(_with_packages(name, src) - seen)
    return seen | data


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep + "/") for dep in (d.rstrip("/") for d in deps))


def missing_deps(dvc: dict, params: dict, root: Path) -> list[tuple[str, str]]:
    """(stage, repo-relative file) for each file a stage runs or reads that its deps do not cover,
    and for each `src/` or `stages/` dep that does not exist."""
    problems = []
    for name, stage in expand_stages(dvc, params).items():
        cmds = stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]
        entries = [m.group(1) for cmd in cmds for m in ENTRY.finditer(cmd)]
        if not entries:
            problems.append((name, f"<no `python stages/<x>.py` in cmd: {stage['cmd']!r}>"))
        deps = [next(iter(d)) if isinstance(d, dict) else str(d) for d in stage.get("deps", [])]
        for dep in deps:  # a library or stage file that moved away: `dvc repro` would stop at it
            if dep.startswith(("src/", "stages/")) and not (root / dep).exists():
                problems.append((name, f"{dep} (in deps, does not exist)"))
        files = set().union(*(code_of(root / entry, root / "src") for entry in entries))
        for file in sorted(files):
            path = file.relative_to(root).as_posix()
            if not _covered(path, deps):
                problems.append((name, path))
    return problems


def load() -> tuple[dict, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text()), yaml.safe_load((REPO / "params.yaml").read_text())


def test_every_stage_depends_on_the_code_it_runs():
    dvc, params = load()
    problems = missing_deps(dvc, params, REPO)
    assert not problems, "dvc.yaml deps miss code the stage runs:\n" + "\n".join(
        f"  {stage}: {path}" for stage, path in problems
    )


def test_stages_are_expanded_and_read_imports_inside_functions():
    dvc, params = load()
    stages = expand_stages(dvc, params)
    assert {f"mine@{name}" for name in params["datasets"]} <= set(stages)
    assert "models/finedefics" in stages["evaluate@finedefics"]["deps"]
    code = {p.relative_to(REPO).as_posix() for p in code_of(REPO / "stages/mine.py", REPO / "src")}
    # stages/mine.py imports inside main(); data/real.py reads the FOCI sets next to the code
    assert {"stages/mine.py", "src/finedefics/mining.py", "src/finedefics/reference/foci"} <= code


@pytest.mark.parametrize(
    "dep",
    [
        "src/finedefics/mining.py",  # a library module, imported inside main()
        "stages/mine.py",  # the entry file itself
        "src/finedefics/reference/foci",  # package data read by data/real.py
    ],
)
def test_deleting_one_dep_line_is_caught(dep):
    dvc, params = load()
    before = set(missing_deps(dvc, params, REPO))
    broken = copy.deepcopy(dvc)
    deps = broken["stages"]["mine"]["do"]["deps"]
    assert dep in deps, f"test premise: mine lists {dep}"
    deps.remove(dep)
    caught = set(missing_deps(broken, params, REPO)) - before
    assert caught == {(f"mine@{name}", dep) for name in params["datasets"]}


def test_a_dep_that_moved_away_is_caught():
    dvc, params = load()
    before = set(missing_deps(dvc, params, REPO))
    broken = copy.deepcopy(dvc)
    deps = broken["stages"]["mine"]["do"]["deps"]
    deps[deps.index("src/finedefics/mining.py")] = "src/finedefics/mine.py"  # as if the module were renamed
    caught = set(missing_deps(broken, params, REPO)) - before
    assert caught == {
        (f"mine@{name}", path)
        for name in params["datasets"]
        for path in ("src/finedefics/mining.py", "src/finedefics/mine.py (in deps, does not exist)")
    }


@pytest.mark.parametrize("config", ["params.yaml", *sorted(p.name for p in (REPO / "configs").glob("*.yaml"))])
def test_every_param_a_stage_lists_is_in_params_and_every_config(config):
    """DVC refuses to run a stage whose listed param is missing from params.yaml, so params.yaml and
    what `finedefics use-config` writes for each overlay must hold every one, used or not."""
    from finedefics.config import dump_params, load_params
    from finedefics.reporting.ledger import flatten

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    listed = set()
    for stage in stages.values():
        for entry in stage.get("do", stage).get("params", []):  # a name, or {file: [names]}
            names = [entry] if isinstance(entry, str) else entry.get("params.yaml") or []
            listed |= {n for n in names if "${" not in n}
    text = (
        (REPO / config).read_text()
        if config == "params.yaml"
        else dump_params(load_params(REPO / "configs" / config), "")
    )
    have = flatten(yaml.safe_load(text))
    missing = sorted(k for k in listed if k not in have and not any(h.startswith(k + ".") for h in have))
    assert not missing, f"{config} lacks {missing}"


@pytest.mark.parametrize("stage,other", [("train_stage1", "stage2"), ("train_stage2", "stage1")])
def test_the_training_stages_list_every_train_param_that_changes_what_they_compute(stage, other):
    """A train.* key a stage does not list is invisible to DVC: `dvc exp run -S train.generation_loss=
    sequence` restored the default's models from the run cache. Only the resume granularity and the
    other stage's section may stay out."""
    from finedefics.config import TrainConfig

    listed = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["params"])
    needed = {f"train.{k}" for k in TrainConfig.model_fields} - {"train.checkpoint_every", f"train.{other}"}
    assert needed <= listed, f"{stage} does not list {sorted(needed - listed)}"


def test_deps_name_package_folders_and_no_empty_file():
    """A package is a dep as its folder (a stage re-runs when any module of it changes: never misses one),
    a top-level module as its file; no dep is an empty file, which DVC warns about on every run."""
    dvc, params = load()
    problems = []
    for name, stage in expand_stages(dvc, params).items():
        for dep in (next(iter(d)) if isinstance(d, dict) else str(d) for d in stage.get("deps", [])):
            path = REPO / dep
            if path.is_file() and path.stat().st_size == 0:
                problems.append(f"{name}: {dep} is empty")
            inner = dep.split("/")[2:] if dep.startswith("src/finedefics/") else []
            if len(inner) > 1 and inner[0] != "reference":
                problems.append(f"{name}: {dep} is inside a package: name its folder")
    assert problems == []
