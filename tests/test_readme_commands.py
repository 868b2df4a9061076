"""The documented command lines parse: every `python -m detailflow_jax.X ... --config ...` command
in README.md (and docs/*.md) goes through that command's own flag parser (``--print_config``: parse,
apply the overrides, print the config, exit) and each ``--config.key=value`` lands in the config."""

from __future__ import annotations

import glob
import importlib
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_COMMAND = re.compile(r"python -m (detailflow_jax\.[\w.]+)((?:\\\n|[^`\n])*)")


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(file, module, arguments) of every documented command that takes --config."""
    found = []
    docs = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    for path in [os.path.join(ROOT, "README.md"), *docs]:
        with open(path) as f:
            text = f.read().replace("\\|", "|")
        for module, rest in _COMMAND.findall(text):
            rest = re.sub(r"\[[^\]]*\]", " ", rest.replace("\\\n", " "))  # drop [optional] parts
            args = shlex.split(rest.split("|")[0] if "|" in rest else rest)
            if "--config" in args:
                found.append((os.path.relpath(path, ROOT), module, args))
    return found


COMMANDS = documented_commands()


def overrides(args: list[str]) -> dict[str, str]:
    return dict(a[len("--config."):].split("=", 1) for a in args if a.startswith("--config."))


def lookup(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def test_the_readme_documents_overrides_of_unset_fields():
    keys = {k for _, _, args in COMMANDS for k in overrides(args)}
    assert {"data.data_dir", "extract.data.data_dir", "losses.lpips_weights"} <= keys, keys


@pytest.mark.parametrize("source,module,args", COMMANDS,
                         ids=[f"{m}:{i}" for i, (_, m, _) in enumerate(COMMANDS)])
def test_documented_command_parses(source, module, args):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", module, *args, "--print_config"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{source}: {module} {' '.join(args)}\n{proc.stderr[-2000:]}"
    config = json.loads(proc.stdout[proc.stdout.index("{"):])
    for key, value in overrides(args).items():
        assert str(lookup(config, key)) == value, (source, key)


RECIPES = [("tokenizer_imagenet", "DF-16"), ("tokenizer_fashion_mnist", ""),
           ("tokenizer_fashion_mnist", "smoke"), ("ar_imagenet", "N=128"),
           ("ar_fashion_mnist", ""), ("ar_fashion_mnist", "smoke")]


@pytest.mark.parametrize("name,arg", RECIPES)
def test_every_unset_field_of_a_recipe_can_be_set_on_the_command_line(name, arg):
    """ml_collections refuses `--config.key=value` for a field whose value is a plain None."""
    config = importlib.import_module(f"configs.{name}").get_config(arg or None)

    def untyped(c, prefix=""):
        for key, value in c.items():
            if hasattr(value, "items"):
                yield from untyped(value, f"{prefix}{key}.")
            elif c.get_type(key) is type(None):
                yield prefix + key

    assert list(untyped(config)) == []
