import json

import pytest
from PIL import Image

from sfumato.errors import SfumatoError
from sfumato.metadata import (
    infotext,
    params_from_infotext,
    params_from_png,
    parse_infotext,
    read_png_text,
    save_png,
)
from sfumato.params import GenerationParams

A1111_TEXT = (
    "masterpiece, a cat, (sitting:1.2)\n"
    "Negative prompt: lowres, bad anatomy\n"
    "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234, Size: 512x768, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "a: 1, b: 2", Version: v1.7.0'
)


def make_text(**kw):
    params = GenerationParams("a red star", negative_prompt="blue", seed=7, **kw).validated()
    return params, infotext(params, seed=7, width=128, height=128, model_name="builtin",
                            model_hash="0123456789")


def test_infotext_has_the_a1111_fields():
    _, text = make_text(clip_skip=2)
    prompt, negative, line = text.split("\n")
    assert prompt == "a red star" and negative == "Negative prompt: blue"
    for field in ("Steps: 20", "Sampler: DPM++ 2M", "Schedule type: Karras", "CFG scale: 7",
                  "Seed: 7", "Size: 128x128", "Model hash: 0123456789", "Model: builtin",
                  "Clip skip: 2"):
        assert field in line


def test_infotext_round_trips_to_the_same_params():
    params, text = make_text(steps=12, cfg_scale=3.5, sampler="Euler a", scheduler="normal")
    again = params_from_infotext(text)
    assert again == params.__class__(**{**params.to_dict(), "width": 128, "height": 128})


def test_a1111_infotext_is_understood():
    info = parse_infotext(A1111_TEXT)
    assert info["prompt"] == "masterpiece, a cat, (sitting:1.2)"
    assert info["negative_prompt"] == "lowres, bad anatomy"
    assert info["Lora hashes"] == "a: 1, b: 2"
    p = params_from_infotext(A1111_TEXT)
    assert (p.steps, p.sampler, p.scheduler, p.cfg_scale, p.seed, p.width, p.height) == (
        28, "DPM++ 2M", "karras", 6.5, 1234, 512, 768)


def test_save_png_is_atomic_and_readable(tmp_path):
    params, text = make_text()
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", infotext=text, params=params.to_dict())
    chunks = read_png_text(path)
    assert chunks["parameters"] == text
    assert json.loads(chunks["sfumato"])["prompt"] == "a red star"
    assert params_from_png(path) == params
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temp file left behind


def test_png_without_parameters_is_a_clear_error(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(SfumatoError, match="no generation parameters"):
        params_from_png(tmp_path / "plain.png")
    (tmp_path / "junk.png").write_text("not a png")
    with pytest.raises(SfumatoError, match="not a readable PNG"):
        params_from_png(tmp_path / "junk.png")
