"""`sfumato generate --server URL` against a real server process (with the fake engine: no torch there)."""

from __future__ import annotations

import base64

import pytest
from click.testing import CliRunner
from server_helpers import ServerProcess, png_b64

from sfumato.cli import cli
from sfumato.metadata import read_png_text
from sfumato.params import GenerationParams
from sfumato.remote import a1111_request, generate_remote


def run(*args, env: dict | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("out"), "--fake-step-seconds", "0")
    yield process
    process.stop()


def test_generate_on_a_server_writes_its_pngs(server, tmp_path):
    result = run("generate", "a red star", "--server", server.url, "--seed", 9, "--steps", 3,
                 "-W", 96, "-H", 64, "--batch", 2, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    files = sorted(tmp_path.glob("*.png"))
    assert [f.name for f in files] == ["00000-9.png", "00001-10.png"]
    text = read_png_text(files[1])["parameters"]  # the server's own metadata, byte for byte
    assert text.startswith("a red star\nSteps: 3") and "Seed: 10" in text and "Size: 96x64" in text
    again = run("generate", "a red star", "--seed", 1, "--out", tmp_path, env={"SFUMATO_SERVER": server.url})
    assert again.exit_code == 0, again.output
    assert (tmp_path / "00002-1.png").exists()  # numbered after the earlier images, as locally


def test_img2img_sends_the_image_and_its_strength():
    params = GenerationParams("x", seed=3, steps=4, denoising_strength=0.4, clip_skip=2).validated()
    path, body = a1111_request(params, init_png=b"png bytes", model="sd15.safetensors")
    assert path == "/sdapi/v1/img2img" and base64.b64decode(body["init_images"][0]) == b"png bytes"
    assert body["denoising_strength"] == 0.4 and body["seed"] == 3
    assert body["override_settings"] == {"CLIP_stop_at_last_layers": 2, "sd_model_checkpoint": "sd15.safetensors"}
    assert a1111_request(params)[0] == "/sdapi/v1/txt2img"
    merging = GenerationParams("x", token_merging_ratio=0.5).validated()  # e.g. from --from A1111.png
    assert a1111_request(merging)[1]["override_settings"]["token_merging_ratio"] == 0.5


def test_server_errors_and_local_options_are_one_line_errors(server, tmp_path):
    refused = run("generate", "x", "--server", server.url, "--model", "nosuch", "--out", tmp_path)
    assert refused.exit_code == 2 and "refused the job (HTTP 422): unknown model 'nosuch'" in refused.output
    local = run("generate", "x", "--server", server.url, "--lora", "style.safetensors:0.8", "--out", tmp_path)
    assert local.exit_code == 2 and "--lora is set where the server starts" in local.output
    gone = run("generate", "x", "--server", "http://127.0.0.1:9", "--out", tmp_path)
    assert gone.exit_code == 2 and "no server answers at http://127.0.0.1:9" in gone.output
    no_scheme = run("generate", "x", "--server", "127.0.0.1:7860", "--out", tmp_path)
    assert no_scheme.exit_code == 2 and "give the server's http:// or https:// URL" in no_scheme.output
    assert "Traceback" not in refused.output + local.output + gone.output + no_scheme.output
    assert not list(tmp_path.glob("*.png"))


def test_a_server_with_a_key_needs_it(tmp_path):
    server = ServerProcess(tmp_path / "out", "--fake-step-seconds", "0", "--api-key", "s3cret")
    try:
        denied = run("generate", "x", "--server", server.url, "--out", tmp_path / "a")
        assert denied.exit_code == 2 and "HTTP 401" in denied.output
        allowed = run("generate", "x", "--server", server.url, "--api-key", "s3cret", "--out", tmp_path / "b")
        assert allowed.exit_code == 0, allowed.output
        assert len(list((tmp_path / "b").glob("*.png"))) == 1
    finally:
        server.stop()


def test_init_image_reaches_the_server(server, tmp_path):
    image = tmp_path / "init.png"
    image.write_bytes(base64.b64decode(png_b64()))
    result = run("generate", "x", "--server", server.url, "--init-image", image, "-W", 64, "-H", 64,
                 "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def test_progress_is_reported_while_the_server_samples(tmp_path):
    server = ServerProcess(tmp_path / "out", "--fake-step-seconds", "0.1")
    try:
        seen = []
        params = GenerationParams("x", seed=1, steps=12, width=64, height=64).validated()
        [image] = generate_remote(server.url, params, on_progress=lambda step, steps: seen.append((step, steps)))
        assert image.seed == 1 and image.png.startswith(b"\x89PNG")
        assert seen and all(steps == 12 and 0 <= step <= 12 for step, steps in seen)
        assert any(step > 0 for step, _ in seen)
    finally:
        server.stop()


def test_ctrl_c_says_the_job_goes_on_in_the_server(server, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("sfumato.remote.generate_remote", interrupted)
    result = run("generate", "x", "--server", server.url, "--out", tmp_path)
    assert result.exit_code == 130 and "the server goes on with the job" in result.output
