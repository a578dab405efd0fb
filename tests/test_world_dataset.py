import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sfumato.errors import SfumatoError
from sfumato.world.cli import render_bench_command, world
from sfumato.world.dataset import ShapesDataset, export_folder
from sfumato.world.scenes import Scene, held_out, scene_in_split


def test_items_are_deterministic_tensors():
    ds = ShapesDataset(seed=3, size=32)
    item = ds[5]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1 and item["image"].std() > 0
    again = ShapesDataset(seed=3, size=32)[5]
    assert torch.equal(item["image"], again["image"]) and item["caption"] == again["caption"]
    assert item["caption"] != ShapesDataset(seed=4, size=32)[5]["caption"] or not torch.equal(
        item["image"], ShapesDataset(seed=4, size=32)[5]["image"])
    assert scene_in_split(Scene.from_json(item["scene"]), "train")


def test_workers_split_one_stream_between_them():
    ds = ShapesDataset(seed=1, size=16, split="concept", length=8)
    single = list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0))
    assert [b["index"].tolist() for b in single] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    parallel = list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2))
    # worker w yields items w, w+2, ...; the loader alternates between the workers' batches
    assert [b["index"].tolist() for b in parallel] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    for batch in parallel:
        for i, index in enumerate(batch["index"].tolist()):
            assert torch.equal(batch["image"][i], ds[index]["image"])
            assert batch["caption"][i] == ds[index]["caption"]
    assert all(any(held_out().is_concept(o) for o in Scene.from_json(s).objects)
               for b in single for s in b["scene"])


def test_disk_cache_returns_what_it_stored(tmp_path):
    fresh = list(ShapesDataset(seed=2, size=32, length=3, cache_dir=tmp_path))
    assert len(list(tmp_path.rglob("*.png"))) == 3
    cached = list(ShapesDataset(seed=2, size=32, length=3, cache_dir=tmp_path))
    for a, b in zip(fresh, cached, strict=True):
        assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]


def test_export_folder_writes_png_and_caption_pairs(tmp_path):
    paths = export_folder(tmp_path, 4, seed=0, split="heldout", size=48)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"0000{i}.png" for i in range(4)] + [f"0000{i}.txt" for i in range(4)])
    assert np.asarray(Image.open(paths[0])).shape == (48, 48, 3)
    assert paths[0].with_suffix(".txt").read_text().strip()


@pytest.mark.parametrize("concept", ["hexagon", "checkered"])
def test_concept_export_shows_that_concept_alone(tmp_path, concept):
    export_folder(tmp_path, 6, seed=3, size=32, concept=concept)
    captions = [p.read_text() for p in sorted(tmp_path.glob("*.txt"))]
    assert len(captions) == 6 and all(concept in c for c in captions)
    others = (held_out().concept_shapes | held_out().concept_patterns) - {concept}
    assert not any(other in c for c in captions for other in others)


def test_unknown_concept_is_a_user_error(tmp_path):
    with pytest.raises(SfumatoError, match="the held-out concepts are: checkered, crescent, hexagon"):
        export_folder(tmp_path, 1, concept="circle")
    assert not list(tmp_path.iterdir())


def test_cli(tmp_path):
    runner = CliRunner()
    result = runner.invoke(world, ["export", "--n", "3", "--split", "concept", "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "c").glob("*.txt"))) == 3
    result = runner.invoke(world, ["show", "--seed", "1", "--n", "4", "--size", "64",
                                   "--out", str(tmp_path / "grid.png")])
    assert result.exit_code == 0, result.output
    width, height = Image.open(tmp_path / "grid.png").size
    assert width >= 4 * 64 and height > 64
    result = runner.invoke(render_bench_command, ["--n", "20"])
    assert result.exit_code == 0 and "images/s" in result.output
