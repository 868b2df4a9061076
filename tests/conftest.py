"""Test set-up: 8 simulated CPU devices (before jax is imported) and the fixture locations."""

import os
import pathlib
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Two pytest workers on two cores: a multi-threaded BLAS in each (FID's 2048x2048 eigh) only oversubscribes.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("DETAILFLOW_DISTRIBUTED", "0")  # never start jax.distributed inside a SLURM job's tests

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests use tiny models: XLA's optimisation passes cost more compile time than they save at run time.
jax.config.update("jax_disable_most_optimizations", True)
# Several tests compile the same programs (e.g. a run and its resumed twin): share them through the disk cache.
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "DETAILFLOW_TEST_COMPILE_CACHE", os.path.join(tempfile.gettempdir(), "detailflow_jax_test_compile_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("DETAILFLOW_SHARED_DIR", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
PARITY_DIR = pathlib.Path(os.environ.get("DETAILFLOW_PARITY_DIR", FIXTURES / "official_parity"))


def parity_folders():
    """Every fixture folder under $DETAILFLOW_PARITY_DIR (each has a config.json)."""
    if not PARITY_DIR.is_dir():
        return []
    return sorted(p for p in PARITY_DIR.iterdir() if (p / "config.json").is_file())


def pytest_generate_tests(metafunc):
    if "parity_folder" in metafunc.fixturenames:
        folders = parity_folders()
        metafunc.parametrize("parity_folder", folders, ids=[p.name for p in folders])


@pytest.fixture(scope="session")
def fixtures_dir():
    if not FIXTURES.is_dir():
        pytest.fail(f"fixtures not found at {FIXTURES}; set DETAILFLOW_SHARED_DIR to the folder holding fixtures/")
    return FIXTURES
