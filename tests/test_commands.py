import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from sfumato.cli import cli
from sfumato.commands import parse_lora_option
from sfumato.metadata import read_png_text


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_generate_writes_pngs_with_parameters(tiny_model_dir, tmp_path):
    result = run("generate", "a red star", "--model", tiny_model_dir, "--seed", 9, "--steps", 3,
                 "-W", 64, "-H", 64, "--batch", 2, "--negative", "blue", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    files = sorted(tmp_path.glob("*.png"))
    assert [f.name for f in files] == ["00000-9.png", "00001-10.png"]
    chunks = read_png_text(files[1])
    assert "Seed: 10" in chunks["parameters"] and "Negative prompt: blue" in chunks["parameters"]
    assert json.loads(chunks["sfumato"])["seed"] == 10


def test_the_command_line_ends_early_with_everything_written(tiny_model_dir, tmp_path):
    # the real entry point (cli.main) skips the interpreter's teardown: the images, the model's
    # traces (a first run writes them) and the exit handlers must all be done before it leaves
    code = ("import atexit, pathlib\n"
            f"atexit.register(pathlib.Path({str(tmp_path / 'handler-ran')!r}).touch)\n"
            "from sfumato.cli import main\n"
            "main()\n")
    args = ["generate", "a red star", "--model", str(tiny_model_dir), "--seed", "3", "--steps", "2",
            "--batch", "2", "--out", str(tmp_path / "out")]
    env = {**os.environ, "SFUMATO_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert [line.split()[-1] for line in done.stdout.splitlines()] == ["seed=3", "seed=4"]
    for line in done.stdout.splitlines():
        assert "Seed: " in read_png_text(line.split()[0])["parameters"]
    assert list((tmp_path / "cache" / "frozen").glob("*/model.json"))
    assert (tmp_path / "handler-ran").exists()


@pytest.mark.parametrize("levers", [[], ["--lever", "deepcache"]])
def test_generate_from_png_recreates_the_image(tiny_model_dir, tmp_path, levers):
    first = run("generate", "a blue ring", "--model", tiny_model_dir, "--seed", 4, "--steps", 6,
                "-W", 64, "-H", 64, "--sampler", "Euler a", "--out", tmp_path / "a", *levers)
    assert first.exit_code == 0, first.output
    [original] = (tmp_path / "a").glob("*.png")
    again = run("generate", "--from", original, "--model", tiny_model_dir, "--out", tmp_path / "b")
    assert again.exit_code == 0, again.output
    [copy] = (tmp_path / "b").glob("*.png")
    from PIL import Image

    assert Image.open(original).tobytes() == Image.open(copy).tobytes()  # lossy levers re-applied
    assert ("Sfumato levers: deepcache" in read_png_text(copy)["parameters"]) == bool(levers)
    if levers:  # and the command line can still turn them off: another picture
        plain = run("generate", "--from", original, "--model", tiny_model_dir, "--out", tmp_path / "c",
                    "--lever", "no-deepcache")
        assert plain.exit_code == 0, plain.output
        [other] = (tmp_path / "c").glob("*.png")
        assert Image.open(other).tobytes() != Image.open(original).tobytes()


def test_generate_from_an_a1111_png_merges_tokens_at_its_ratio(tiny_model_dir, tmp_path):
    from PIL import Image, PngImagePlugin

    first = run("generate", "a blue ring", "--model", tiny_model_dir, "--seed", 4, "--steps", 4,
                "-W", 64, "-H", 64, "--lever", "tome=0.3", "--out", tmp_path / "a")
    assert first.exit_code == 0, first.output
    [original] = (tmp_path / "a").glob("*.png")
    infotext = read_png_text(original)["parameters"]
    assert "Token merging ratio: 0.3" in infotext
    # as A1111 writes it: its own key only, and no sfumato JSON chunk
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext.replace("Sfumato levers: tome, ", ""))
    Image.open(original).save(tmp_path / "a1111.png", pnginfo=info)

    again = run("generate", "--from", tmp_path / "a1111.png", "--model", tiny_model_dir, "--out", tmp_path / "b")
    assert again.exit_code == 0, again.output
    [copy] = (tmp_path / "b").glob("*.png")
    assert Image.open(copy).tobytes() == Image.open(original).tobytes()
    assert "Token merging ratio: 0.3" in read_png_text(copy)["parameters"]
    off = run("generate", "--from", tmp_path / "a1111.png", "--model", tiny_model_dir, "--out", tmp_path / "c",
              "--lever", "no-tome")
    assert off.exit_code == 0, off.output
    [other] = (tmp_path / "c").glob("*.png")
    assert Image.open(other).tobytes() != Image.open(original).tobytes()
    assert "Token merging" not in read_png_text(other)["parameters"]


def test_bad_input_exits_2_without_traceback(tiny_model_dir, tmp_path):
    for args, needle in [
        (["--steps", 0], "steps must be between 1 and 150"),
        (["--sampler", "nope"], "unknown sampler"),
        (["-W", 65], "multiple of 8"),
    ]:
        result = run("generate", "x", "--model", tiny_model_dir, "--out", tmp_path, *args)
        assert result.exit_code == 2, result.output
        assert needle in result.output and "Traceback" not in result.output
    missing = run("generate", "x", "--model", tmp_path / "nope.safetensors", "--out", tmp_path)
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    assert not list(tmp_path.glob("*.png"))


def test_lora_option_parsing():
    assert parse_lora_option("style.safetensors:0.8") == ("style.safetensors", 0.8, 0.8)
    assert parse_lora_option("C:/x/s.safetensors:1:0.5") == ("C:/x/s.safetensors", 1.0, 0.5)
    assert parse_lora_option("name") == ("name", 1.0, 1.0)


def test_info_describes_a_model_and_refuses_pickles(tiny_model_dir, tmp_path):
    result = run("info", tiny_model_dir, "--json")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output[result.output.index("{"):])
    assert facts["family"] == "sd1"
    text = run("info", tiny_model_dir)
    assert text.exit_code == 0 and "unet: " in text.output and "{" not in text.output  # one line a fact
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04junk")
    refused = run("info", pickle)
    assert refused.exit_code == 2 and "--allow-pickle" in refused.output
