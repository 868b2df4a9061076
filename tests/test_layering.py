"""The package's layering (docs/architecture.md#what-may-import-what): every import of every
module, at any level, stays inside what its unit may import, so train/ and eval/ never lean on each
other and a model never reaches up into a stage."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "detailflow_jax"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# unit -> the other units it may import. "foundation" is every top-level module but quickstart;
# "tokenizer.extract" is the code-extraction stage, which keeps its command name under
# tokenizer/.
F = "foundation"
ALLOWED = {
    F: set(),
    "nn": {F},
    "data": {F},
    "losses": {F, "nn"},
    "tokenizer": {F, "nn"},
    "ar": {F, "nn"},
    "convert": {F, "nn", "losses", "tokenizer", "ar"},
    "inference": {F, "nn", "tokenizer", "ar"},
    "tokenizer.extract": {F, "nn", "data", "tokenizer", "inference"},
    "train": {F, "nn", "data", "losses", "tokenizer", "ar", "inference"},
    "eval": {F, "nn", "data", "tokenizer", "ar", "convert", "inference"},
    "preflight": {F, "nn", "data", "losses", "tokenizer", "ar", "inference", "train"},
    "quickstart": {F, "nn", "data", "tokenizer", "tokenizer.extract", "ar", "inference", "train",
                   "eval"},
}
STAGE_MODULES = {"detailflow_jax.tokenizer.extract": "tokenizer.extract"}
# Known breaks, each to be removed with its fix (the test fails once one is gone); none at present.
PENDING: set[tuple[str, str]] = set()


def unit(module: str) -> str:
    """The unit a dotted module name belongs to."""
    for stage, name in STAGE_MODULES.items():
        if module == stage or module.startswith(stage + "."):
            return name
    parts = module.split(".")
    if len(parts) == 1:
        return F
    if (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return "quickstart" if parts[1] == "quickstart" else F


def is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: pathlib.Path):
    """(line, imported module) for every import of a detailflow_jax module in ``path``, nested
    ones included; ``from pkg import name`` counts as importing ``pkg.name`` when that is a
    module."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base
                     for a in node.names]
        else:
            continue
        for name in names:
            if name == "detailflow_jax" or name.startswith("detailflow_jax."):
                yield node.lineno, name


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_unit_is_in_the_table():
    missing = sorted({unit(module_name(p)) for p in modules()} - set(ALLOWED))
    assert not missing, f"add {missing} to ALLOWED here and to docs/architecture.md"


def test_imports_stay_inside_the_layering():
    bad, pending = [], set()
    for path in modules():
        source = unit(module_name(path))
        for line, name in sorted(set(project_imports(path))):
            target = unit(name)
            if target == source or target in ALLOWED.get(source, ()):
                continue
            relative = str(path.relative_to(ROOT))
            if (relative, name) in PENDING:
                pending.add((relative, name))
            else:
                bad.append(f"{relative}:{line} imports {name} ({source} may not import {target})")
    assert not bad, "layering broken:\n" + "\n".join(bad)
    assert pending == PENDING, f"fixed, take them out of PENDING: {sorted(PENDING - pending)}"


def test_the_table_has_no_cycle():
    order, seen = [], set()

    def visit(name, path):
        assert name not in path, f"cycle in ALLOWED: {' -> '.join(path + (name,))}"
        if name not in seen:
            for dep in sorted(ALLOWED[name]):
                visit(dep, path + (name,))
            seen.add(name)
            order.append(name)

    for name in ALLOWED:
        visit(name, ())


def documented_table() -> dict[str, set[str]]:
    """{unit: may import} from the matrix in docs/architecture.md: a row per unit (| `unit` | ...),
    its columns the units in the same order, ✓ where the row may import the column."""
    rows = []
    for line in ARCHITECTURE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if re.fullmatch(r"`[\w.]+`", cells[0]):
            rows.append((cells[0].strip("`"), cells[1:]))
    names = [name for name, _ in rows]
    assert all(len(marks) == len(names) for _, marks in rows), "the matrix is not square"
    return {name: {names[j] for j, mark in enumerate(marks) if mark == "✓"} for name, marks in rows}


def test_docs_table_matches():
    documented = documented_table()
    assert list(documented) == list(ALLOWED), "the matrix rows are not ALLOWED's units, in order"
    assert documented == ALLOWED
