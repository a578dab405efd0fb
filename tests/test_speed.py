import json

import numpy as np
from click.testing import CliRunner

from sfumato.checkpoints import BUILTIN_MODEL, load_model
from sfumato.speed import FIELDS, builtin_standin, fidelity, speed_command, summarize


def test_bench_runs_end_to_end_and_prints_every_field(tiny_model_dir, monkeypatch):
    # the subprocesses inherit these: one thread, no spinning, is fastest for a tiny model
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    result = CliRunner().invoke(speed_command, [
        "--model", str(tiny_model_dir), "--size", "64", "--steps", "2", "--runs", "1",
        "--cli-runs", "1", "--cli-model", str(tiny_model_dir), "--json"])
    assert result.exit_code == 0, result.output
    for _, label in FIELDS:
        assert label in result.output
    assert "fidelity vs fp32 eager diffusers" in result.output and "`sfumato generate` wall" in result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    ours, theirs = figures["medians"]["sfumato"], figures["medians"]["diffusers"]
    for row in (ours, theirs):
        assert row["image_s"] > row["unet_step_s"] > 0 and row["vae_decode_s"] > 0
        assert row["peak_rss_mb"] > 50 and row["load_cold_s"] > 0 and row["load_warm_s"] is None
    # same model, scheduler, noise: the images agree up to float rounding
    assert figures["fidelity"]["max_abs_diff"] <= 2 / 255
    assert figures["fidelity"]["psnr_db"] > 40
    assert len(figures["generate_cli_s"]) == 1 and figures["generate_cli_s"][0] > 0


def test_fidelity():
    image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    assert fidelity(image, image) == {"psnr_db": float("inf"), "max_abs_diff": 0.0}
    other = image.copy()
    other[0, 0, 0] += 51
    quality = fidelity(other, image)
    assert abs(quality["max_abs_diff"] - 0.2) < 1e-9 and 20 < quality["psnr_db"] < 60


def test_summary_takes_cold_load_from_the_first_run_and_medians_of_the_rest():
    def run(seconds, load):
        return {"image_s": seconds, "unet_step_s": seconds / 10, "vae_decode_s": 1.0, "peak_rss_mb": 100.0,
                "import_s": 2.0, "load_s": load}

    table = summarize({"sfumato": [run(5, 9), run(3, 2), run(4, 4)], "diffusers": [run(6, 8)]})
    assert table["sfumato"]["image_s"] == 4 and table["sfumato"]["load_cold_s"] == 9
    assert table["sfumato"]["load_warm_s"] == 3 and table["diffusers"]["load_warm_s"] is None


def test_builtin_standin_loads(tmp_path):
    path = builtin_standin(tmp_path)
    assert path == BUILTIN_MODEL or path == tmp_path / "builtin-random"
    model = load_model(path)
    assert model.family == "sd1" and model.default_size == 128
