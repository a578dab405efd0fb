import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from sfumato import speed
from sfumato.checkpoints import BUILTIN_MODEL, load_model
from sfumato.speed import FIELDS, PHASES, builtin_standin, fidelity, speed_command, summarize


def test_bench_runs_end_to_end_and_prints_every_field(tiny_model_dir, monkeypatch):
    # the subprocesses inherit these: one thread, no spinning, is fastest for a tiny model
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    result = CliRunner().invoke(speed_command, [
        "--model", str(tiny_model_dir), "--size", "64", "--steps", "2", "--runs", "1",
        "--cli-runs", "0", "--json"])
    assert result.exit_code == 0, result.output
    for key, label in FIELDS:
        assert (label in result.output) == (key != "peak_gpu_mb")  # GPU memory: on CUDA only
    assert "fidelity vs fp32 eager diffusers" in result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    ours, theirs = figures["medians"]["sfumato"], figures["medians"]["diffusers"]
    for row in (ours, theirs):
        assert row["image_s"] > row["unet_step_s"] > 0 and row["vae_decode_s"] > 0
        assert row["peak_rss_mb"] > 50 and row["load_cold_s"] > 0 and row["load_warm_s"] is None
        assert row["peak_gpu_mb"] is None and row["first_image_s"] is None  # no warm-up without compile or CUDA
    # same model, scheduler, noise: the images agree up to float rounding
    assert figures["fidelity"]["max_abs_diff"] <= 2 / 255
    assert figures["fidelity"]["psnr_db"] > 40
    assert "startup" not in figures


def test_startup_times_the_command_and_its_phases(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    # the phases run here rather than in a fresh process: the same function, one subprocess fewer
    def phases_here(request, env):  # the same function, one subprocess fewer; the command's cache
        monkeypatch.setenv("SFUMATO_CACHE", env["SFUMATO_CACHE"])
        return speed.startup_phases(Path(request["model"]), Path(request["out"]), request["spawned"])

    monkeypatch.setattr(speed, "spawn", phases_here)
    found = speed.time_startup(tiny_model_dir, 1, tmp_path)
    assert found["first_wall_s"] > 0 and found["wall_s"][0] > 0 and found["cpu_s"][0] > 0
    assert found["loadavg"] >= 0
    [phases] = found["phases"]
    assert all(phases[key] >= 0 for key, _ in PHASES) and phases["decode_s"] > 0 and phases["sample_s"] > 0
    assert (phases["size"], phases["steps"]) == (64, 20)  # the CLI's defaults on this model
    assert phases["bundle"]  # the first command traced the model for the later ones
    # then two jobs through a `sfumato serve` of the model, the first untimed
    assert len(found["server_wall_s"]) == 1 and found["server_wall_s"][0] > 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00000-1.png", "00001-1.png", "00002-1.png",
                                                              "00003-1.png", "phases.png"]
    assert "`sfumato generate` wall" in speed.format_startup(found)


def test_startup_only_skips_the_comparison(monkeypatch, tmp_path):
    def no_comparison(*_):
        raise AssertionError("the comparison ran")

    found = {"first_wall_s": 9.5, "wall_s": [3.0, 1.0, 2.0], "cpu_s": [2.0, 2.0, 2.0], "loadavg": 0.5,
             "phases": [{**{key: 0.25 for key, _ in PHASES}, "size": 128, "steps": 20, "bundle": True}] * 3,
             "server_wall_s": [0.5, 0.7, 0.6]}
    monkeypatch.setattr(speed, "compare_with_diffusers", no_comparison)
    monkeypatch.setattr(speed, "time_startup", lambda model, runs, out: found)
    result = CliRunner().invoke(speed_command, ["--startup-only", "--cli-model", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert "first run (a fresh cache: it traces the networks) 9.50 s" in result.output
    assert "later runs (from the model's traces) median 2.00 s of 3 (3.00, 1.00, 2.00)" in result.output and "128x128, 20 steps" in result.output
    assert all(f"{label} 0.25" in result.output for _, label in PHASES)
    assert "--server` wall, against a running `sfumato serve` of the model: median 0.60 s" in result.output
    assert json.loads(result.output.strip().splitlines()[-1])["startup"] == found


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
