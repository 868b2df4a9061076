"""launch/: syntax (bash -n, shellcheck when installed), --help, refusal of missing settings, the
recipes, and what the scripts actually run (gcloud / srun / python replaced by stand-ins that print
their arguments)."""

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from configs.common import MESH_RECIPES

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
ENTRY_SCRIPTS = [s for s in SCRIPTS if s != "lib.sh"]  # lib.sh is sourced, not run
RECIPES = sorted(p.stem for p in (LAUNCH / "recipes").glob("*.env"))


def _env(**extra):
    """The environment without settings that the scripts read, so a test sees only what it sets."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TPU_", "SLURM_", "DETAILFLOW_", "XLA_", "LIBTPU_"))
        and k != "FAKE_DEVICES"
    }
    env.update(extra)
    return env


def _bash(*args, env=None, timeout=60, **kwargs):
    return subprocess.run(
        ["bash", *map(str, args)],
        cwd=ROOT,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def _stand_in(path: pathlib.Path, body: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


def _fake_python(path: pathlib.Path) -> pathlib.Path:
    """Prints what it was asked to run; the scripts' own helper calls (-c, -m configs.common) go to
    the real one."""
    return _stand_in(path, f'''
if [[ "$1" == -c || "$2" == configs.common ]]; then exec {shlex.quote(sys.executable)} "$@"; fi
echo "ARGS: $*"
echo "XLA_FLAGS=${{XLA_FLAGS:-}}"
echo "PROCESS=${{DETAILFLOW_PROCESS_ID:-}}/${{DETAILFLOW_NUM_PROCESSES:-}}@${{DETAILFLOW_COORDINATOR:-}}"
''')  # noqa: E501


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    result = _bash("-n", LAUNCH / script)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
    result = subprocess.run(
        ["shellcheck", "-x", *(f"launch/{s}" for s in SCRIPTS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_help(script):
    args = ["--help"] if script != "tpu_vm.sh" else ["run", "--help"]
    result = _bash(LAUNCH / script, *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


@pytest.mark.parametrize("args, message", [
    (["local.sh"], "missing MODULE"),
    (["local.sh", "--processes", "2", "m"], "needs --fake-devices"),
    (["run_on_host.sh", "m"], "missing --accelerator"),
    (["run_on_host.sh", "--accelerator", "gpu", "m"], "must be tpu, cuda or cpu"),
    (["run_on_host.sh", "--accelerator", "cpu", "--recipe", "v9-1", "m"], "no recipe 'v9-1'"),
    (["tpu_vm.sh", "run", "--", "m"], "missing --name (or TPU_NAME)"),
    (["tpu_vm.sh", "run", "--name", "n", "--", "m"], "missing --zone (or TPU_ZONE)"),
    (["tpu_vm.sh", "run", "--name", "n", "--zone", "z"], "missing the command after --"),
    (["tpu_vm.sh", "create", "--name", "n", "--zone", "z"], "missing --type"),
    (["tpu_vm.sh", "reboot"], "unknown command 'reboot'"),
    (["slurm_gpu.sbatch", "m"], "not inside a SLURM job"),
    (["slurm_gpu.sbatch"], "missing MODULE"),
])
def test_missing_or_bad_settings_are_refused(args, message):
    result = _bash(LAUNCH / args[0], *args[1:])
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_recipes_cover_the_mesh_recipes():
    assert set(RECIPES) == set(MESH_RECIPES)
    for name in RECIPES:
        result = _bash("-c", f"set -eu; . launch/recipes/{name}.env; echo $DETAILFLOW_MESH")
        assert result.returncode == 0, (name, result.stderr)
        assert result.stdout.strip() == name


def _recipe_var(name, var):
    return _bash("-c", f'set -eu; . launch/recipes/{name}.env; echo "${{{var}:-}}"').stdout.strip()


def _xla_accepts(flags: str) -> bool:
    code = "import jax; jax.devices()"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode == 0


def test_gpu_recipe_xla_flags_are_known_to_this_xla():
    # XLA aborts on unknown XLA_FLAGS (GPU flags included, on any backend): a renamed flag shows up
    # here.
    flag_sets = {_recipe_var(name, "XLA_FLAGS") for name in RECIPES} - {""}
    assert flag_sets
    for flags in flag_sets:
        assert _xla_accepts(flags), flags
    assert not _xla_accepts("--xla_gpu_no_such_flag_detailflow=true")


def test_tpu_recipes_name_a_type_and_runtime():
    for name in RECIPES:
        if _recipe_var(name, "LIBTPU_INIT_ARGS"):
            assert _recipe_var(name, "TPU_TYPE") and _recipe_var(name, "TPU_VERSION"), name


def test_local_runs_processes_and_stops_all_when_one_fails(tmp_path):
    python = _fake_python(tmp_path / "python")
    result = _bash(
        LAUNCH / "local.sh",
        "--processes",
        "3",
        "--fake-devices",
        "2",
        "--recipe",
        "cpu",
        "--",
        "some.module",
        "--x",
        "a b",
        "--config",
        "c.py:smoke",
        "--config.mesh.fsdp=2",
        env=_env(PYTHON=str(python)),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sorted(line.split("@")[0] for line in lines if line.startswith("PROCESS=")) == \
        ["PROCESS=0/3", "PROCESS=1/3", "PROCESS=2/3"]
    # one coordinator
    assert len({line.split("@")[1] for line in lines if line.startswith("PROCESS=")}) == 1
    # The recipe's mesh goes right after --config FILE (ml_collections wants the file first); the
    # user's wins.
    assert (
        "ARGS: -m some.module --x a b --config c.py:smoke --config.mesh.data=-1 "
        "--config.mesh.fsdp=1 "
        "--config.mesh.tensor=1 --config.mesh.fsdp=2"
    ) in lines
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in lines

    # Process 1 fails at once; the others would run for a minute: local.sh must stop them and fail.
    failing = _stand_in(tmp_path / "failing", f'''
if [[ "$1" == -c ]]; then exec {shlex.quote(sys.executable)} "$@"; fi
if [[ "$DETAILFLOW_PROCESS_ID" == 1 ]]; then exit 3; fi
exec sleep 60
''')
    start = time.monotonic()
    result = _bash(
        LAUNCH / "local.sh",
        "--processes",
        "3",
        "--fake-devices",
        "1",
        "m",
        env=_env(PYTHON=str(failing)),
    )
    assert result.returncode != 0 and time.monotonic() - start < 30


def test_run_on_host_exports_the_recipe_and_sets_the_mesh(tmp_path):
    _fake_python(tmp_path / "venv" / "bin" / "python")
    result = _bash(
        LAUNCH / "run_on_host.sh",
        "--accelerator",
        "cuda",
        "--venv",
        tmp_path / "venv",
        "--no-install",
        "--recipe",
        "2x8xH100",
        "--",
        "detailflow_jax.train.tokenizer",
        "--config=c.py",
        "--workdir",
        "/w",
    )
    assert result.returncode == 0, result.stderr
    assert (
        "ARGS: -m detailflow_jax.train.tokenizer --config=c.py --config.mesh.data=2 "
        "--config.mesh.fsdp=8 "
        "--config.mesh.tensor=1 --workdir /w"
    ) in result.stdout
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in result.stdout

    result = _bash(
        LAUNCH / "run_on_host.sh",
        "--accelerator",
        "cpu",
        "--venv",
        tmp_path / "none",
        "--no-install",
        "m",
    )
    assert result.returncode != 0 and "--install-only first" in result.stderr


def _remote_command(dry_run_line: str) -> tuple[list[str], str]:
    args = shlex.split(dry_run_line)
    command = next(a for a in args if a.startswith("--command="))
    return args, command[len("--command="):]


def test_tpu_vm_runs_one_command_on_all_workers_and_stops_it(tmp_path):
    result = _bash(
        LAUNCH / "tpu_vm.sh",
        "run",
        "--name",
        "df",
        "--zone",
        "us-west4-a",
        "--recipe",
        "v5e-256",
        "--run-name",
        "r1",
        "--env",
        "TFDS_DATA_DIR=gs://b/tfds",
        "--dry-run",
        "--",
        "detailflow_jax.train.tokenizer",
        "--config",
        "configs/tokenizer_imagenet.py:DF-16",
        "--workdir",
        "gs://b/it's",
    )
    assert result.returncode == 0, result.stderr
    start_line, stream_line = result.stdout.strip().splitlines()
    args, remote = _remote_command(start_line)
    assert args[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in args
    assert "--zone=us-west4-a" in args
    assert "--worker=0" in stream_line and "logs/r1.log" in stream_line

    # Run the worker's command in a fake home with a stand-in bootstrap that waits for SIGTERM like
    # a trainer.
    home = tmp_path / "home"
    _stand_in(home / "detailflow_jax" / "launch" / "run_on_host.sh", '''
printf 'arg: %s\\n' "$@"
echo "env: $DETAILFLOW_DISTRIBUTED $TFDS_DATA_DIR"
trap 'echo "saved and stopped"; exit 0' TERM
for _ in $(seq 600); do sleep 0.1; done
''')
    subprocess.run(
        ["bash", "-c", remote], cwd=home, env=_env(HOME=str(home)), check=True, timeout=30
    )
    logs = home / "detailflow_jax" / "logs"
    pid = int((logs / "latest.pid").read_text())
    try:
        deadline = time.monotonic() + 20
        while "env:" not in (logs / "r1.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = (logs / "r1.log").read_text()
        assert "env: 1 gs://b/tfds" in log
        assert "arg: --recipe\narg: v5e-256\narg: --\narg: detailflow_jax.train.tokenizer" in log
        assert "arg: gs://b/it's" in log

        stop = _bash(
            LAUNCH / "tpu_vm.sh", "stop", "--name", "df", "--zone", "us-west4-a", "--dry-run"
        )
        _, stop_remote = _remote_command(stop.stdout.strip())
        out = subprocess.run(
            ["bash", "-c", stop_remote], cwd=home, capture_output=True, text=True, timeout=30
        )
        assert "sent SIGTERM" in out.stdout
        deadline = time.monotonic() + 20
        while (
            "saved and stopped" not in (logs / "r1.log").read_text() and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert "saved and stopped" in (logs / "r1.log").read_text()
    finally:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_tpu_vm_create_takes_type_and_runtime_from_the_recipe():
    result = _bash(
        LAUNCH / "tpu_vm.sh",
        "create",
        "--name",
        "df",
        "--zone",
        "z",
        "--recipe",
        "v4-128",
        "--spot",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    args = shlex.split(result.stdout)
    assert args[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "df"]
    assert {
        "--accelerator-type=v4-128",
        "--version=tpu-ubuntu2204-base",
        "--spot",
        "--zone=z",
    } <= set(args)


def test_slurm_script_starts_one_task_per_node(tmp_path):
    _stand_in(tmp_path / "bin" / "srun", 'echo "srun $*"\n')
    env = _env(
        PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        SLURM_JOB_ID="7",
        SLURM_SUBMIT_DIR=str(ROOT),
    )
    result = _bash(LAUNCH / "slurm_gpu.sbatch", "--no-install", "--recipe", "2x8xH100", "--",
                   "detailflow_jax.train.tokenizer", "--workdir", "/shared/w", env=env)
    assert result.returncode == 0, result.stderr
    assert (
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash launch/run_on_host.sh --accelerator "
        "cuda --no-install "
        "--recipe 2x8xH100 -- detailflow_jax.train.tokenizer --workdir /shared/w"
    ) in result.stdout

    env["SLURM_SUBMIT_DIR"] = str(tmp_path)
    result = _bash(LAUNCH / "slurm_gpu.sbatch", "--no-install", "m", env=env)
    assert result.returncode != 0 and "run sbatch from the repository root" in result.stderr


def test_a_recipe_for_another_slice_is_refused_by_the_trainer(tmp_path):
    # The whole path: recipe -> --config.mesh.* overrides -> config -> mesh check before anything is
    # allocated.
    result = _bash(
        LAUNCH / "local.sh",
        "--fake-devices",
        "8",
        "--recipe",
        "v5e-256",
        "detailflow_jax.train.tokenizer",
        "--config",
        "configs/tokenizer_fashion_mnist.py:smoke",
        "--workdir",
        tmp_path / "w",
        timeout=300,
    )
    assert result.returncode != 0
    assert (
        "mesh {'data': 16, 'fsdp': 16, 'tensor': 1} uses 256 devices but 8 are available"
        in result.stderr
    )
