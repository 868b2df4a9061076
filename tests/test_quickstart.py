"""The main job's plumbing end to end at smoke size: every stage runs, writes its outputs, and a rerun resumes."""

import json

import pytest

from detailflow_jax import quickstart


def test_main_job_runs_every_stage_and_resumes(tmp_path):
    workdir = str(tmp_path / "job")
    timings = quickstart.run_main_job(workdir, smoke=True, quality_samples=20)
    assert set(timings) == {"tokenizer", "codes", "gpt", "samples", "quality", "total"}
    for path in ("samples/samples.png", "samples/coarse_to_fine.png", "samples/samples.gif",
                 "tokenizer/reconstruction_psnr.json", "quality.json", "timings.json", "codes/metadata.json"):
        assert (tmp_path / "job" / path).is_file(), path
    report = json.loads((tmp_path / "job" / "quality.json").read_text())
    assert {"GPT samples", "untrained GPT samples", "tokenizer reconstructions (all tokens)"} <= set(report["rows"])
    for row in report["rows"].values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["frechet_distance"] >= 0.0

    again = quickstart.run_main_job(workdir, smoke=True, quality_samples=20)
    assert again == pytest.approx(timings, abs=0.2)  # every stage skipped: the recorded times come back
