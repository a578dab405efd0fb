"""A1111 compatibility checked by A1111's own third-party client (`webuiapi` from PyPI) against a
real server process running a tiny random model."""

from __future__ import annotations

import threading

import pytest
import webuiapi
from server_helpers import ServerProcess, png_b64, wait_for


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("out"), "--model", str(tiny_model_dir))
    yield process
    process.stop()


@pytest.fixture
def api(server):
    return webuiapi.WebUIApi(port=server.port, sampler="Euler", steps=2)


def test_txt2img_and_img2img(api):
    result = api.txt2img(prompt="a red star", seed=11, width=64, height=64, batch_size=2)
    assert [image.size for image in result.images] == [(64, 64), (64, 64)]
    assert result.info["all_seeds"] == [11, 12] and result.info["sd_model_name"] == "tiny-sd"
    assert result.parameters["prompt"] == "a red star"
    assert "Seed: 12" in result.images[1].info["parameters"]

    again = api.img2img(images=[result.image], prompt="a red star", seed=3, width=64, height=64,
                        denoising_strength=0.5, steps=4)
    assert again.image.size == (64, 64) and again.info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in again.image.info["parameters"]


def test_options_and_models(api):
    assert api.util_get_model_names() == ["tiny-sd"]
    api.util_set_model("tiny-sd")
    assert api.util_get_current_model() == "tiny-sd"
    assert "Euler a" in api.util_get_sampler_names()


def test_interrupt_stops_a_long_generation(api, server):
    done = {}
    thread = threading.Thread(target=lambda: done.update(
        result=api.txt2img(prompt="x", width=64, height=64, steps=100)))
    thread.start()
    wait_for(lambda: api.get_progress()["state"]["sampling_step"] >= 1, timeout=60)
    api.interrupt()
    thread.join(30)
    assert not thread.is_alive() and done["result"].images == []
    assert api.get_progress()["state"]["job_count"] == 0


def test_png_info_reads_what_txt2img_wrote(api, server):
    import httpx

    image = api.txt2img(prompt="a blue moon", seed=5, width=64, height=64).image
    text = image.info["parameters"]
    r = httpx.post(server.url + "/sdapi/v1/png-info", json={"image": webuiapi.raw_b64_img(image)})
    assert r.json()["info"] == text and r.json()["parameters"]["Seed"] == "5"
    assert httpx.post(server.url + "/sdapi/v1/png-info", json={"image": png_b64()}).json()["info"] == ""
