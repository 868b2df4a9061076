"""The main job's plumbing end to end at smoke size: every stage runs, writes its outputs, a rerun
resumes, and a rerun with other settings reruns what they change (never reusing a result made with
the old ones)."""

import json

import pytest

from detailflow_jax import quickstart
from detailflow_jax.config_lib import ConfigError
from detailflow_jax.data import codes as codes_lib


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("job")
    return workdir, quickstart.run_main_job(str(workdir), smoke=True, quality_samples=20)


def test_main_job_runs_every_stage_and_resumes(job):
    workdir, timings = job
    assert set(timings) == {"tokenizer", "codes", "gpt", "samples", "quality", "total"}
    for path in (
        "samples/samples.png",
        "samples/coarse_to_fine.png",
        "samples/samples.gif",
        "tokenizer/reconstruction_psnr.json",
        "quality.json",
        "timings.json",
        "codes/metadata.json",
    ):
        assert (workdir / path).is_file(), path
    report = json.loads((workdir / "quality.json").read_text())
    assert {
        "GPT samples",
        "untrained GPT samples",
        "tokenizer reconstructions (all tokens)",
    } <= set(report["rows"])
    for row in report["rows"].values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["frechet_distance"] >= 0.0

    again = quickstart.run_main_job(str(workdir), smoke=True, quality_samples=20)
    # every stage skipped: the recorded times come back
    assert again == pytest.approx(timings, abs=0.2)


def test_other_settings_rerun_the_stages_they_change(job, capsys):
    workdir, timings = job
    capsys.readouterr()
    quickstart.run_main_job(str(workdir), smoke=True, gpt_steps=9, quality_samples=20)
    out = capsys.readouterr().out
    assert "tokenizer: done already" in out and "codes: done already" in out
    for stage in ("gpt", "samples", "quality"):
        assert f"== {stage}: settings or inputs changed" in out, out
    assert json.loads((workdir / "gpt" / "config.json").read_text())["total_steps"] == 9

    # A longer tokenizer: it resumes, the codes of the old checkpoint are re-extracted, and the GPT
    # trained on them is not continued on the new codes.
    with pytest.raises(
        ConfigError, match=r"inputs of the gpt stage changed .*gpt was trained on the old ones"
    ):
        quickstart.run_main_job(
            str(workdir), smoke=True, tokenizer_steps=9, gpt_steps=9, quality_samples=20
        )
    assert codes_lib.read_metadata(str(workdir / "codes")).tokenizer["step"] == 9
