"""Every file the package reads or writes goes through etils.epath (detailflow_jax/storage.py), so
that a bucket works wherever a local path does: no module calls the local-only file functions,
except where the path is always local (the allow-list, each entry with its reason)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "detailflow_jax"

# Calls that only reach the local disk (a dotted name matches itself and its members: "shutil" is
# shutil.*).
LOCAL_ONLY = (
    "open",
    "os.makedirs",
    "os.mkdir",
    "os.path.exists",
    "os.path.isfile",
    "os.path.isdir",
    "os.path.getsize",
    "os.listdir",
    "os.scandir",
    "os.walk",
    "os.replace",
    "os.rename",
    "os.remove",
    "os.unlink",
    "shutil",
    "glob",
    "pathlib.Path",
    "tempfile",
    "np.load",
    "np.savez",
    "np.savez_compressed",
)

ALLOWED = {
    (
        "storage.py",
        "tempfile",
    ): "the local cache that bucket files are copied into for local-only readers",
    ("storage.py", "np.savez"): "into an epath file object",
    ("storage.py", "np.load"): "from an epath file object",
    (
        "eval/reference_stats.py",
        "np.load",
    ): "from an epath file object (arr_0 is read only when asked for)",
    (
        "data/codes.py",
        "tempfile",
    ): "the ArrayRecord writer writes a local file; commit() uploads it to the bucket",
    (
        "convert/pt_reader.py",
        "open",
    ): "reads the checkpoint that state_dict.load_state_dict copied to local disk",
    (
        "convert/state_dict.py",
        "open",
    ): "a downloaded checkpoint, copied to local disk first (storage.local_copy)",
    ("convert/state_dict.py", "np.load"): "as above",
    (
        "config_lib.py",
        "os.path.isfile",
    ): "config files are Python modules, imported from the local checkout",
    ("config_lib.py", "os.path.exists"): "as above",
    ("preflight/__main__.py", "tempfile"): "a scratch file that captures the compiler's log",
    (
        "data/fashion_mnist.py",
        "pathlib.Path",
    ): "image data is read from a local disk or a mounted bucket "
    "(data/sources.py refuses a gs:// data_dir, saying so)",
    (
        "data/imagefolder.py",
        "pathlib.Path",
    ): "as above: the class-folder tree and the TFDS files built from it",
}


def dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def local_io_calls(source: str) -> list[tuple[int, str]]:
    """(line, matched name) of every call to a LOCAL_ONLY function in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and (name := dotted(node.func)):
            match = next((m for m in LOCAL_ONLY if name == m or name.startswith(m + ".")), None)
            if match:
                found.append((node.lineno, match))
    return found


def test_the_scan_finds_local_file_calls():
    source = (
        "import os, shutil\nopen('x')\nos.path.exists(p)\nshutil.copy(a, "
        "b)\nepath.Path(p).open('r')\n"
        "f.open()\nimport tempfile\ntempfile.mkdtemp()\n"
    )
    assert local_io_calls(source) == [
        (2, "open"),
        (3, "os.path.exists"),
        (4, "shutil"),
        (8, "tempfile"),
    ]


def test_no_module_calls_local_only_file_functions():
    offending, used = [], set()
    for file in sorted(PACKAGE.rglob("*.py")):
        rel = file.relative_to(PACKAGE).as_posix()
        for line, name in local_io_calls(file.read_text()):
            if (rel, name) in ALLOWED:
                used.add((rel, name))
            else:
                offending.append(f"detailflow_jax/{rel}:{line}: {name}(...)")
    assert not offending, (
        "local-only file calls; use epath through detailflow_jax.storage (or allow-list one "
        "whose path is always local, with its reason):\n" + "\n".join(offending)
    )
    assert used == set(ALLOWED), (
        f"allow-list entries no longer needed: {sorted(set(ALLOWED) - used)}"
    )
