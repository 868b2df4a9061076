"""Test set-up: 8 simulated CPU devices (before jax is imported) and the fixture locations."""

import os
import pathlib
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Two pytest workers on two cores: a multi-threaded BLAS in each (FID's 2048x2048 eigh) only
# oversubscribes.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# never start jax.distributed inside a SLURM job's tests
os.environ.setdefault("DETAILFLOW_DISTRIBUTED", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests use tiny models: XLA's optimisation passes cost more compile time than they save at run
# time.
jax.config.update("jax_disable_most_optimizations", True)
# Several tests compile the same programs (e.g. a run and its resumed twin): share them through the
# disk cache.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get(
        "DETAILFLOW_TEST_COMPILE_CACHE",
        os.path.join(tempfile.gettempdir(), "detailflow_jax_test_compile_cache"),
    ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Fixtures small enough for the repository: the official code's outputs on tiny random models.
REPO_FIXTURES = ROOT / "tests" / "fixtures"
# Fixtures too large for it (full-size FID Inception, LPIPS-VGG16 and DINO ViT-S/16 weights with
# their outputs): a folder holding fid_inception/ and losses/, from $DETAILFLOW_LARGE_FIXTURES, else
# the optional shared folder beside the checkout (where CI keeps them).
LARGE_FIXTURES_VAR = "DETAILFLOW_LARGE_FIXTURES"
LARGE_FIXTURES = pathlib.Path(
    os.environ.get(LARGE_FIXTURES_VAR, ROOT.parent / "shared" / "fixtures")
)
MAKE_LARGE_COMMAND = ("python tests/fixtures/make_large.py --official <DetailFlow checkout> "
                      f"--out <folder for ${LARGE_FIXTURES_VAR}>")


def parity_folders():
    """Every fixture folder (one with a config.json) under tests/fixtures/official_parity/, then
    under each folder of $DETAILFLOW_PARITY_DIR (os.pathsep-separated), which adds folders made
    elsewhere."""
    roots = [REPO_FIXTURES / "official_parity"]
    roots += [
        pathlib.Path(p) for p in os.environ.get("DETAILFLOW_PARITY_DIR", "").split(os.pathsep) if p
    ]
    folders = []
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(
                f"parity fixture folder {root} does not exist (check $DETAILFLOW_PARITY_DIR)"
            )
        folders += sorted(p for p in root.iterdir() if (p / "config.json").is_file())
    return folders


def pytest_generate_tests(metafunc):
    if "parity_folder" in metafunc.fixturenames:
        folders = parity_folders()
        ids = [p.name if p.parent == REPO_FIXTURES / "official_parity" else str(p) for p in folders]
        metafunc.parametrize("parity_folder", folders, ids=ids)


@pytest.fixture(scope="session")
def repo_fixtures():
    return REPO_FIXTURES


@pytest.fixture(scope="session")
def large_fixtures():
    """The folder with fid_inception/ and losses/; the test is skipped, saying how to get them, when
    it is absent."""
    if not (LARGE_FIXTURES / "fid_inception").is_dir() or not (LARGE_FIXTURES / "losses").is_dir():
        pytest.skip(
            f"large fixtures not found at {LARGE_FIXTURES}: set ${LARGE_FIXTURES_VAR} to a folder "
            "holding "
            f"fid_inception/ and losses/; make one with `{MAKE_LARGE_COMMAND}` "
            "(tests/fixtures/MAKE_OFFICIAL.md)"
        )
    return LARGE_FIXTURES
