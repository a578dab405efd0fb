"""The HTTP API in-process (FastAPI TestClient) with a fake engine: A1111 shapes, jobs API,
caps, name resolution, auth, quotas, CORS."""

from __future__ import annotations

import base64
import io
import json
import threading

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from server_helpers import fake_factory, fake_model_folder, png_b64, wait_for

from sfumato.errors import SfumatoError
from sfumato.metadata import read_png_text
from sfumato.server.app import Caps, ServerConfig, create_app
from sfumato.server.auth import ApiKey, AuthConfig, check_bind

SMALL = {"steps": 3, "width": 64, "height": 64}


@pytest.fixture
def engines():
    return []


@pytest.fixture
def make_client(tmp_path, engines):
    clients = []

    def make(step_seconds: float = 0.0, **config) -> TestClient:
        config.setdefault("outputs", tmp_path / "out")
        app = create_app(ServerConfig(engine_factory=fake_factory(step_seconds, engines), **config))
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_txt2img_has_a1111_response_shape(make_client, tmp_path, engines):
    client = make_client()
    body = {"prompt": "a red star", "seed": 7, "batch_size": 2, "sampler_name": "Euler a",
            "not_an_a1111_field": 1, **SMALL}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["parameters"]["prompt"] == "a red star" and data["parameters"]["seed"] == 7
    assert data["parameters"]["cfg_scale"] == 7.0  # A1111's default echoed
    info = json.loads(data["info"])  # a JSON *string*, as in A1111
    assert info["all_seeds"] == [7, 8] and info["sampler_name"] == "Euler a"
    assert len(data["images"]) == 2
    image = Image.open(io.BytesIO(base64.b64decode(data["images"][1])))
    assert image.size == (64, 64)
    assert image.info["parameters"] == info["infotexts"][1] and "Seed: 8" in image.info["parameters"]
    call = engines[0].calls[0]
    assert call["sampler"] == "Euler a" and call["seed"] == 7 and call["batch_size"] == 2
    assert "not_an_a1111_field" not in call
    # the images were also written to the outputs folder, with metadata
    written = sorted((tmp_path / "out").rglob("*.png"))
    assert len(written) == 2
    assert json.loads(read_png_text(written[0])["sfumato"])["seed"] == 7


def test_a1111_defaults_are_a1111s(make_client, engines):
    client = make_client()
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64})
    assert r.status_code == 200
    call = engines[0].calls[0]
    assert (call["steps"], call["cfg_scale"], call["sampler"]) == (50, 7.0, "Euler")


def test_wrong_type_gives_422_naming_the_field(make_client):
    r = make_client().post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": "many"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][-1] == "steps"


@pytest.mark.parametrize("body, cap", [
    ({"width": 4096, "height": 4096}, "max_pixels"),
    ({"steps": 500}, "max_steps"),
    ({"batch_size": 4, "n_iter": 4}, "max_images"),
    ({"prompt": "x" * 5000}, "max_prompt_chars"),
])
def test_caps_give_422_naming_the_cap(make_client, body, cap):
    r = make_client().post("/sdapi/v1/txt2img", json={**SMALL, **body})
    assert r.status_code == 422 and cap in r.json()["detail"]


def test_caps_are_configurable(make_client):
    client = make_client(caps=Caps(max_steps=2))
    assert client.post("/api/jobs", json={"prompt": "x", **SMALL}).status_code == 422
    assert client.post("/api/jobs", json={"prompt": "x", **SMALL, "steps": 2}).status_code == 202


def test_img2img_passes_the_init_image_and_strength(make_client, engines):
    client = make_client()
    r = client.post("/sdapi/v1/img2img", json={
        "prompt": "x", "init_images": ["data:image/png;base64," + png_b64()],
        "denoising_strength": 0.4, **SMALL})
    assert r.status_code == 200, r.text
    call = engines[0].calls[0]
    assert call["init_image"].getpixel((0, 0)) == (200, 30, 30)
    assert call["denoising_strength"] == 0.4
    assert r.json()["parameters"]["init_images"] is None  # not echoed unless include_init_images


def test_images_are_never_fetched_from_urls(make_client):
    r = make_client().post("/sdapi/v1/img2img", json={
        "prompt": "x", "init_images": ["http://127.0.0.1:1/cat.png"], **SMALL})
    assert r.status_code == 422 and "URL" in r.json()["detail"]


def test_upload_caps(make_client):
    client = make_client(caps=Caps(max_upload_bytes=1000))
    big = png_b64(size=64, noise=True)  # ~12 KiB, over 1000 bytes
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [big], **SMALL})
    assert r.status_code == 422 and "max_upload_bytes" in r.json()["detail"]
    r = client.post("/api/jobs", content=b"{" + b" " * 3_000_000 + b"}",
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "max-upload-bytes" in r.json()["detail"]


def test_png_info_round_trip(make_client):
    client = make_client()
    image = client.post("/sdapi/v1/txt2img", json={"prompt": "a blue moon", "seed": 3, **SMALL}).json()["images"][0]
    r = client.post("/sdapi/v1/png-info", json={"image": image})
    assert r.status_code == 200
    assert r.json()["parameters"]["prompt"] == "a blue moon" and r.json()["parameters"]["Seed"] == "3"
    assert "sfumato" in r.json()["items"]


def test_models_loras_and_options(make_client, tmp_path, engines):
    models = fake_model_folder(tmp_path / "models", "alpha.safetensors", "sub/beta")
    loras = fake_model_folder(tmp_path / "loras", "style.safetensors")
    client = make_client(models_dir=models, lora_dir=loras)
    titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert titles == ["builtin", "alpha.safetensors", "sub/beta"]
    assert [x["name"] for x in client.get("/sdapi/v1/loras").json()] == ["style"]
    assert {s["name"] for s in client.get("/sdapi/v1/samplers").json()} >= {"Euler", "DPM++ 2M"}
    assert "karras" in [s["name"] for s in client.get("/sdapi/v1/schedulers").json()]

    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sub/beta"}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "sub/beta"
    client.post("/sdapi/v1/txt2img", json={"prompt": "x <lora:style:0.5>", **SMALL})
    assert engines[-1].model.name == "beta"  # the worker loaded the model switched to
    r = client.post("/sdapi/v1/txt2img", json={
        "prompt": "x", "override_settings": {"sd_model_checkpoint": "alpha"}, **SMALL})
    assert r.status_code == 200 and engines[-1].model.name == "alpha.safetensors"


def test_token_merging_ratio_from_a_request_or_the_options_reaches_the_job(make_client, engines):
    client = make_client()
    client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL})
    assert engines[-1].calls[-1]["token_merging_ratio"] is None  # the server's --lever decides
    assert "token_merging_ratio" not in client.get("/sdapi/v1/options").json()
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "override_settings": {"token_merging_ratio": 0.3},
                                                **SMALL})
    assert r.status_code == 200 and engines[-1].calls[-1]["token_merging_ratio"] == 0.3
    assert client.post("/sdapi/v1/options", json={"token_merging_ratio": 0.5}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["token_merging_ratio"] == 0.5
    client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL})
    assert engines[-1].calls[-1]["token_merging_ratio"] == 0.5
    for bad in (1.5, "half"):
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "override_settings": {"token_merging_ratio": bad},
                                                    **SMALL})
        assert r.status_code == 422 and "token_merging_ratio" in r.json()["detail"]
        assert client.post("/sdapi/v1/options", json={"token_merging_ratio": bad}).status_code == 422


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../x", "nope"])
def test_names_resolve_only_inside_their_folders(make_client, tmp_path, name):
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    models = fake_model_folder(tmp_path / "models", "alpha.safetensors")
    loras = fake_model_folder(tmp_path / "loras", "style.safetensors")
    client = make_client(models_dir=models, lora_dir=loras)
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name}).status_code == 422
    assert client.post("/api/jobs", json={"prompt": "x", "model": name, **SMALL}).status_code == 422
    assert client.post("/api/jobs", json={"prompt": "x", "vae": name, **SMALL}).status_code == 422
    r = client.post("/api/jobs", json={"prompt": "x", "loras": [{"name": name}], **SMALL})
    assert r.status_code == 422
    r = client.post("/sdapi/v1/txt2img", json={"prompt": f"x <lora:{name}:1>", **SMALL})
    assert r.status_code == 422 and "lora" in r.json()["detail"]


def test_jobs_api_submit_status_history_and_image(make_client, tmp_path):
    client = make_client()
    r = client.post("/api/jobs", json={"prompt": "a green cube", "seed": 5, "batch_size": 2, **SMALL})
    assert r.status_code == 202
    job_id = r.json()["id"]
    job = wait_for(lambda: (j := client.get(f"/api/jobs/{job_id}").json())["status"] == "done" and j)
    assert [i["seed"] for i in job["images"]] == [5, 6]
    png = client.get(job["images"][1]["url"])
    assert png.headers["content-type"] == "image/png"
    assert "Seed: 6" in Image.open(io.BytesIO(png.content)).info["parameters"]
    assert (tmp_path / "out" / job["images"][1]["path"]).exists()
    assert [j["id"] for j in client.get("/api/jobs").json()] == [job_id]
    assert client.post("/api/jobs", json={"prompt": "x", "stepz": 3}).status_code == 422  # typo


def test_cancel_queued_and_running_jobs(make_client):
    client = make_client(step_seconds=0.05)
    running = client.post("/api/jobs", json={"prompt": "a", **SMALL, "steps": 100}).json()["id"]
    queued = client.post("/api/jobs", json={"prompt": "b", **SMALL}).json()["id"]
    assert client.post(f"/api/jobs/{queued}/cancel").json()["status"] == "cancelled"
    wait_for(lambda: client.get(f"/api/jobs/{running}").json()["progress"] > 0)
    client.post(f"/api/jobs/{running}/cancel")
    job = wait_for(lambda: (j := client.get(f"/api/jobs/{running}").json())["status"] != "running" and j)
    assert job["status"] == "cancelled" and job["images"] == []


def test_progress_preview_and_interrupt(make_client):
    client = make_client(step_seconds=0.05)
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        r=client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL, "steps": 100})))
    thread.start()
    progress = wait_for(lambda: (p := client.get("/sdapi/v1/progress").json())["current_image"] and p)
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 100
    assert Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).size == (64, 64)
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(10)
    assert result["r"].status_code == 200 and result["r"].json()["images"] == []
    assert client.get("/sdapi/v1/progress").json()["progress"] == 0


def test_sse_streams_progress_with_previews_then_the_result(make_client):
    client = make_client(step_seconds=0.02)
    job_id = client.post("/api/jobs", json={"prompt": "x", **SMALL, "steps": 40}).json()["id"]
    events = []
    with client.stream("GET", f"/api/jobs/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                events.append([line[7:]])
            elif line.startswith("data:"):
                events[-1].append(json.loads(line[5:]))
    kinds = [e[0] for e in events]
    assert kinds[-1] == "status" and events[-1][1]["status"] == "done"
    assert "progress" in kinds
    assert any(e[1].get("preview", "").startswith("data:image/png;base64,") for e in events)


def test_auth_bearer_basic_and_open_health(make_client):
    auth = AuthConfig(keys=(ApiKey("alice", "alice-key-123"),), basic={"bob": "hunter22"})
    client = make_client(auth=auth)
    assert client.get("/health").status_code == 200
    for path in ("/", "/docs", "/api/jobs", "/sdapi/v1/sd-models"):
        assert client.get(path).status_code == 401, path
    assert client.get("/api/jobs", headers={"Authorization": "Bearer wrong-key-123"}).status_code == 401
    assert client.get("/api/jobs", headers={"Authorization": "Bearer alice-key-123"}).status_code == 200
    assert client.get("/sdapi/v1/options", auth=("bob", "hunter22")).status_code == 200
    assert client.get("/sdapi/v1/options", auth=("bob", "wrong")).status_code == 401
    assert client.get("/", auth=("anyone", "alice-key-123")).status_code == 200  # key in a browser


def test_monthly_quota_gives_429_and_survives_restart(make_client, tmp_path):
    auth = AuthConfig(keys=(ApiKey("alice", "alice-key-123", monthly_images=3),))
    headers = {"Authorization": "Bearer alice-key-123"}
    client = make_client(auth=auth)
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "x", "batch_size": 2, **SMALL},
                       headers=headers).status_code == 200
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "batch_size": 2, **SMALL}, headers=headers)
    assert r.status_code == 429 and "resets" in r.json() and int(r.headers["Retry-After"]) > 0
    restarted = make_client(auth=auth)  # same outputs folder: the count is in SQLite
    r = restarted.post("/api/jobs", json={"prompt": "x", "batch_size": 2, **SMALL}, headers=headers)
    assert r.status_code == 429
    r = restarted.post("/api/jobs", json={"prompt": "x", **SMALL}, headers=headers)
    assert r.status_code == 202


def test_cors_only_when_configured(make_client):
    preflight = {"Origin": "http://example.org", "Access-Control-Request-Method": "POST"}
    closed = make_client()
    assert "access-control-allow-origin" not in closed.options("/api/jobs", headers=preflight).headers
    opened = make_client(cors_origins=("http://example.org",))
    r = opened.options("/api/jobs", headers=preflight)
    assert r.headers["access-control-allow-origin"] == "http://example.org"


def test_non_loopback_bind_needs_credentials():
    check_bind("127.0.0.1", AuthConfig())
    check_bind("::1", AuthConfig())
    with pytest.raises(SfumatoError, match="refusing"):
        check_bind("0.0.0.0", AuthConfig())
    check_bind("0.0.0.0", AuthConfig(keys=(ApiKey("a", "a-long-key"),)))


def test_openapi_docs_are_served(make_client):
    client = make_client()
    assert client.get("/docs").status_code == 200
    assert "/sdapi/v1/txt2img" in client.get("/openapi.json").json()["paths"]


def test_keys_files_json_and_toml(tmp_path):
    from sfumato.server.auth import load_keys_file

    (tmp_path / "keys.json").write_text(
        '{"keys": [{"name": "alice", "key": "alice-key-123", "monthly_images": 5}]}')
    (tmp_path / "keys.toml").write_text('[[keys]]\nname = "bob"\nkey = "bob-key-1234"\n')
    assert load_keys_file(tmp_path / "keys.json") == (ApiKey("alice", "alice-key-123", 5),)
    assert load_keys_file(tmp_path / "keys.toml") == (ApiKey("bob", "bob-key-1234", None),)
    (tmp_path / "bad.json").write_text('{"keys": [{"key": "short"}]}')
    with pytest.raises(SfumatoError, match="at least 8"):
        load_keys_file(tmp_path / "bad.json")


def test_serve_passes_its_levers_to_every_model_it_loads(tmp_path, monkeypatch):
    import uvicorn
    from click.testing import CliRunner

    import sfumato.server.app
    from sfumato.server.cli import serve

    configs = []
    monkeypatch.setattr(sfumato.server.app, "create_app", configs.append)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)
    out = ["--outputs", str(tmp_path / "out")]
    result = CliRunner().invoke(serve, [*out, "--lever", "turbo"])
    assert result.exit_code != 0 and "unknown speed lever 'turbo'" in result.output and not configs
    assert CliRunner().invoke(serve, [*out, "--lever", "compile"]).exit_code == 0
    factory = configs[0].engine_factory
    assert factory.keywords == {"levers": ("compile",)}
