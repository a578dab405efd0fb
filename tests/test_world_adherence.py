import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import sfumato
from sfumato.bench import bench
from sfumato.errors import SfumatoError
from sfumato.params import GenerationParams
from sfumato.world.adherence import (
    ImageResult,
    Report,
    Sample,
    category_scores,
    claim_report,
    contact_sheet,
    format_table,
    image_correct,
    overall_score,
    parse_cfg_list,
    run_adherence,
    select_prompts,
)
from sfumato.world.captions import Claim, check
from sfumato.world.suite import read_suite

CATEGORIES = "colors,negative,concept"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machine is shared by many processes; two torch threads then wait on each other
    and a tiny UNet call takes seconds instead of tenths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def claims(*holds):
    return {Claim("color", f"claim {i}"): h for i, h in enumerate(holds)}


def result(category, *holds, cfg=7.0):
    return ImageResult(f"{category}-1", category, cfg, 0, claims(*holds))


# ----------------------------------------------------------------------------- scoring

def test_an_image_counts_only_when_all_its_claims_hold():
    assert image_correct(claims(True, True, True))
    assert not image_correct(claims(True, False, True))
    assert not image_correct({})  # nothing checked is nothing shown


def test_category_means_and_overall_without_concept():
    results = [result("colors", True), result("colors", True, False), result("colors", True),
               result("colors", False), result("counting", True), result("concept", True)]
    scores = category_scores(results)
    assert scores == {"colors": 0.5, "counting": 1.0, "concept": 1.0}
    assert overall_score(scores) == 0.75  # categories weigh the same; concept left out
    assert math.isnan(overall_score({"concept": 1.0}))


def make_report(results, samples=()):
    prompts = {p.id: p for p in read_suite()}
    return Report("v1", {"name": "m", "hash": "h", "path": "p"}, {}, prompts, results, 1.0, list(samples))


def test_report_scores_each_cfg_on_its_own():
    results = [result("colors", True, cfg=1.0), result("colors", False, cfg=7.0),
               result("concept", True, cfg=7.0)]
    report = make_report([ImageResult("colors-001", r.category, r.cfg, 0, r.claims) if r.category == "colors"
                          else ImageResult("concept-001", r.category, r.cfg, 0, r.claims) for r in results])
    assert report.cfgs == [1.0, 7.0]
    assert report.overall(1.0) == 1.0 and report.overall(7.0) == 0.0
    data = report.to_dict()
    assert data["scores"]["7"]["categories"] == {"colors": 0.0, "concept": 1.0}
    assert data["images"][0]["claims"] == [{"kind": "color", "text": "claim 0", "holds": True}]
    sweep = format_table(report).splitlines()
    assert len(sweep) == 3 and sweep[1].split()[0] == "1" and sweep[2].split()[0] == "7"
    assert "overall" in sweep[0] and sweep[0].split()[-1] == "concept"


def test_single_cfg_table_has_a_row_per_category():
    report = make_report([ImageResult("colors-001", "colors", 7.0, 0, claims(True)),
                          ImageResult("counting-001", "counting", 7.0, 0, claims(False)),
                          ImageResult("concept-001", "concept", 7.0, 0, claims(True))])
    rows = {line.split("  ")[0].strip(): line.split() for line in format_table(report).splitlines()}
    assert rows["colors"][1] == "1.000" and rows["counting"][1] == "0.000"
    assert rows["overall (GenEval)"][-1] == "0.500"
    assert rows["concept (excluded)"][2] == "1.000"


def test_contact_sheet_marks_right_and_wrong_images():
    prompt = read_suite()[0]
    gray = Image.new("RGB", (96, 96), (128, 128, 128))
    sheet = np.asarray(contact_sheet([Sample(prompt, 7.0, [(gray, True), (gray, False)])]))
    left, right = sheet[:, 240:340], sheet[:, 340:]
    is_green = lambda a: ((a[..., 1] > 120) & (a[..., 0] < 60)).sum()  # noqa: E731
    is_red = lambda a: ((a[..., 0] > 180) & (a[..., 1] < 60)).sum()  # noqa: E731
    assert is_green(left) > 10 and is_red(left) == 0
    assert is_red(right) > 10 and is_green(right) == 0


def test_selection_and_cfg_parsing():
    suite = read_suite()
    chosen = select_prompts(suite, ["colors", "concept"], limit=2)
    assert [p.category for p in chosen] == ["colors", "colors", "concept", "concept"]
    with pytest.raises(SfumatoError, match="unknown category.*this suite has: single_object"):
        select_prompts(suite, ["colours"])
    assert parse_cfg_list("1, 3,7.5") == [1.0, 3.0, 7.5]
    with pytest.raises(SfumatoError, match="comma-separated"):
        parse_cfg_list("1;3")


class RendererPipe:
    """A stand-in model that draws the scene a prompt asks for (or, if `ignore`, always the same
    red circle): the benchmark must give the first full marks and the second far less."""

    def __init__(self, suite, ignore=False):
        from sfumato.world.suite import scene_for

        self.model = SimpleNamespace(name="renderer", hash="0" * 10, path="-")
        self.scenes = {(p.prompt, p.negative_prompt): scene_for(p.expectation) for p in suite}
        self.ignore = ignore

    def generate(self, params):
        from sfumato.world.render import render
        from sfumato.world.scenes import ObjectSpec, Scene

        scene = self.scenes[(params.prompt, params.negative_prompt)]
        if self.ignore:
            scene = Scene("white", (ObjectSpec("circle", "red", "medium", 0.5, 0.5),))
        return [SimpleNamespace(image=Image.fromarray(render(scene, 128)), seed=params.seed + i, scene=scene)
                for i in range(params.batch_size)]


def test_a_perfect_model_gets_full_marks_and_a_deaf_one_does_not():
    suite = select_prompts(read_suite(), limit=2)
    perfect = run_adherence(RendererPipe(suite), suite, images_per_prompt=2, progress=False)
    assert set(perfect.scores().values()) == {1.0} and perfect.overall() == 1.0
    deaf_pipe = RendererPipe(suite, ignore=True)
    deaf = run_adherence(deaf_pipe, suite, images_per_prompt=1, progress=False)
    circle = deaf_pipe.generate(GenerationParams(suite[0].prompt))[0]
    truth = category_scores(ImageResult(p.id, p.category, 7.0, 0, check(p.expectation, circle.scene.objects, "white"))
                            for p in suite)
    assert deaf.scores() == truth and deaf.overall() < 0.4


# ----------------------------------------------------------------------------- end to end

def test_benchmark_runs_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    args = ["adherence", "--model", str(tiny_model_dir), "--device", "cpu", "--categories", CATEGORIES,
            "--limit", "1", "--steps", "2", "--images-per-prompt", "2", "--out", str(out)]
    run = CliRunner().invoke(bench, args)
    assert run.exit_code == 0, run.output
    lines = run.output.splitlines()
    for row in ("colors ", "negative ", "overall (GenEval) ", "concept (excluded) ", "elapsed "):
        assert any(line.startswith(row) for line in lines), (row, run.output)
    report = json.loads((out / "adherence.json").read_text())
    assert {"suite_version", "model", "params", "scores", "images", "elapsed_s"} <= set(report)
    assert report["suite_version"] == "v1" and len(report["model"]["hash"]) == 10
    assert report["params"]["steps"] == 2 and report["params"]["cfg"] == [7.0]
    assert [i["seed"] for i in report["images"]] == [0, 1] * 3
    assert {i["category"] for i in report["images"]} == set(CATEGORIES.split(","))
    negative = next(i for i in report["images"] if i["category"] == "negative")
    assert negative["negative_prompt"] and negative["claims"][-1]["text"].endswith(
        f"color not {negative['negative_prompt']}")
    colors = report["scores"]["7"]["categories"]
    assert report["scores"]["7"]["overall"] == pytest.approx((colors["colors"] + colors["negative"]) / 2, abs=1e-4)
    with Image.open(out / "adherence.png") as sheet:
        assert sheet.size == (240 + 2 * 100, 3 * 100)  # one row per prompt, one cell per image


def test_cfg_sweep_prints_one_row_per_value(tiny_model_dir, tmp_path):
    args = ["adherence", "--model", str(tiny_model_dir), "--device", "cpu", "--categories", "colors",
            "--limit", "1", "--steps", "1", "--images-per-prompt", "1", "--cfg", "1,7",
            "--out", str(tmp_path)]
    run = CliRunner().invoke(bench, args)
    assert run.exit_code == 0, run.output
    table = run.output[run.output.index("cfg "):].splitlines()
    assert table[0].split()[:2] == ["cfg", "colors"]
    assert [row.split()[0] for row in table[1:3]] == ["1", "7"]
    assert set(json.loads((tmp_path / "adherence.json").read_text())["scores"]) == {"1", "7"}


def test_batch_size_does_not_change_what_is_judged(tiny_model_dir):
    pipe = sfumato.load(str(tiny_model_dir), device="cpu")
    suite = select_prompts(read_suite(), ["color_attribution"], limit=1)
    kwargs = dict(images_per_prompt=3, cfg=7.0, steps=2, seed=5, progress=False)
    whole, split = run_adherence(pipe, suite, **kwargs), run_adherence(pipe, suite, batch=2, **kwargs)
    assert [r.seed for r in whole.results] == [5, 6, 7]
    assert [(r.seed, r.claims) for r in whole.results] == [(r.seed, r.claims) for r in split.results]
    assert len(whole.results[0].claims) == 4  # two shapes, two colours


def test_bad_suite_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a star", "expectation": {"objects": [{"shape": "star"}]}}\n{"prompt": 3}\n')
    run = CliRunner().invoke(bench, ["adherence", "--suite", str(path), "--out", str(tmp_path)])
    assert run.exit_code == 2
    assert "line 2" in run.output and "lacks ['expectation']" in run.output


def test_claim_report_counts_images_and_failures_by_kind():
    shape, color = Claim("shape", "a star"), Claim("color", "red")
    report = claim_report([{shape: True, color: True}, {shape: False, color: True}, {shape: False, color: False}])
    assert report == "0.333 of 3 pass every claim; claims failed by kind: color 0.33, shape 0.67"


def test_the_clip_score_prefers_the_scene_a_prompt_asks_for():
    from sfumato.world.clip_score import ClipScorer

    # 40 prompts: on 9, one image's luck moves the mean by a point (the margin is ~15 on these)
    categories = ["single_object", "colors", "two_objects", "background", "color_attribution"]
    suite = select_prompts(read_suite(), categories, limit=8)
    scorer = ClipScorer()
    right = run_adherence(RendererPipe(suite), suite, images_per_prompt=1, clip_scorer=scorer, progress=False)
    deaf = run_adherence(RendererPipe(suite, ignore=True), suite, images_per_prompt=1, clip_scorer=scorer,
                         progress=False)
    assert all(0 <= r.clip_score <= 100 for r in right.results + deaf.results)
    assert overall_score(right.clip_scores()) > overall_score(deaf.clip_scores()) + 2
    table = format_table(right)
    assert table.splitlines()[0].endswith("clip") and f"{overall_score(right.clip_scores()):.1f}" in table
    assert right.to_dict()["scores"]["7"]["clip_score"]["categories"] == right.clip_scores()
