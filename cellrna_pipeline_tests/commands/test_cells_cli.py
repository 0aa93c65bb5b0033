"""``cellrna cells segment`` and ``cellrna train``: outputs, input variants, bad input."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import tifffile

from cellrna_pipeline.cli import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def volume(tiny_config):
    """(c, z, y, x) uint16 nucleus + cytoplasm of the tiny acquisition."""
    from cellrna_pipeline.core.synth import synthesize

    return synthesize(tiny_config).image[0, :2]


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    import torch

    from cellrna_pipeline.core.segmentation.model import (
        MaskRCNNConfig,
        build_model,
        save_model_folder,
    )

    torch.manual_seed(0)
    config = MaskRCNNConfig(
        fpn_channels=32,
        input_size_px=64,
        box_head_dim=32,
        mask_head_channels=16,
        semantic_channels=16,
    )
    return save_model_folder(build_model(config), tmp_path_factory.mktemp("m") / "cell-maskrcnn")


def test_segment_classical_3d_two_channels(capsys, tmp_path, volume):
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, volume, metadata={"axes": "CZYX"})
    code, out, err = _run(
        capsys,
        "cells",
        "segment",
        path,
        "--out",
        tmp_path / "out",
        "--method",
        "classical",
        "--voxel-size-nm",
        600,
        150,
        150,
    )
    assert code == 0, err
    cells = tifffile.imread(tmp_path / "out" / "cells.tif")
    nuclei = tifffile.imread(tmp_path / "out" / "nuclei.tif")
    assert cells.shape == nuclei.shape == volume.shape[1:]
    assert cells.max() >= 1
    inside = nuclei > 0
    assert (cells[inside] == nuclei[inside]).all()
    assert "cells" in out


def test_segment_2d_nucleus_only_float_any_range(capsys, tmp_path, volume):
    plane = (volume[0, 4].astype(np.float32) - 100.0) * 1e-3  # float, negative values, tiny range
    path = tmp_path / "nuc.tif"
    tifffile.imwrite(path, plane)
    code, _, err = _run(
        capsys, "cells", "segment", path, "--out", tmp_path / "o", "--method", "classical"
    )
    assert code == 0, err
    cells = tifffile.imread(tmp_path / "o" / "cells.tif")
    assert cells.shape == plane.shape and cells.max() >= 1
    assert np.array_equal(cells, tifffile.imread(tmp_path / "o" / "nuclei.tif"))
    assert "estimated" in err


def test_segment_with_a_model_folder(capsys, tmp_path, volume, tiny_model_folder):
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, volume[:, 3:5], metadata={"axes": "CZYX"})
    code, _, err = _run(
        capsys,
        "cells",
        "segment",
        path,
        "--out",
        tmp_path / "out",
        "--model",
        tiny_model_folder,
        "--diameter-px",
        12,
    )
    assert code == 0, err
    assert tifffile.imread(tmp_path / "out" / "cells.tif").shape == volume[0, 3:5].shape
    assert "model: folder" in err and "hint" in err


@pytest.mark.parametrize(
    ("make", "extra", "match"),
    [
        (None, (), "no such file"),
        (lambda p: p.write_bytes(b"not a tiff"), (), "TIFF"),
        (
            lambda p: tifffile.imwrite(p, np.full((16, 16), np.nan, np.float32)),
            ("--method", "classical"),
            "NaN",
        ),
        (
            lambda p: tifffile.imwrite(
                p, np.zeros((2, 16, 16), np.uint16), metadata={"axes": "CYX"}
            ),
            ("--cell-channel", "5"),
            "out of range",
        ),
        (
            lambda p: tifffile.imwrite(p, np.ones((16, 16), np.uint16)),
            ("--method", "classical"),
            "constant",
        ),
        (
            lambda p: tifffile.imwrite(p, np.zeros((16, 16), np.uint16)),
            ("--diameter-px", "-3"),
            "positive",
        ),
    ],
)
def test_segment_bad_input_exits_2_with_one_line(capsys, tmp_path, make, extra, match):
    path = tmp_path / "in.tif"
    if make is not None:
        make(path)
    code, _, err = _run(capsys, "cells", "segment", path, "--out", tmp_path / "out", *extra)
    assert code == 2
    assert err.count("\n") == 1 and match in err, err
    assert not (tmp_path / "out" / "cells.tif").exists()


def test_train_cells_tiny_run_writes_a_model_folder(capsys, tmp_path, monkeypatch):
    import cellrna_pipeline.core.segmentation.train as train_module
    from cellrna_pipeline.core.segmentation.model import MaskRCNNConfig

    real = train_module.run_training
    seen = {}

    def shrunk(config, out, **kwargs):  # the command's wiring, on a tiny model and volume
        seen["config"] = config
        small = {"shape_zyx": (6, 64, 64), "n_nuclei_volumes": 0}
        config = config.model_copy(
            update={
                "model": MaskRCNNConfig(
                    fpn_channels=32,
                    input_size_px=64,
                    box_head_dim=32,
                    mask_head_channels=16,
                    semantic_channels=16,
                ),
                "data": config.data.model_copy(update=small),
                "val_data": config.val_data.model_copy(update=small),
                "val_slices": 2,
            }
        )
        return real(config, out, **kwargs)

    monkeypatch.setattr(train_module, "run_training", shrunk)
    monkeypatch.setenv("CELLRNA_HOME", str(tmp_path / "home"))
    code, _, err = _run(
        capsys, "train", "cells", "--steps", 1, "--volumes", 1, "--out", tmp_path / "model"
    )
    assert code == 0, err
    assert (tmp_path / "model" / "weights.pt").exists() and (
        tmp_path / "model" / "model_card.md"
    ).exists()
    assert (
        "cellrna train cells --steps 1 --volumes 1"
        in (tmp_path / "model" / "model_card.md").read_text()
    )
    assert (
        seen["config"].steps == 1
        and seen["config"].data.n_volumes == 1
        and seen["config"].seed == 0
    )


def _capture_training(monkeypatch, tmp_path):
    """Replace the trainer by one that records the config it gets (the command's wiring)."""
    from types import SimpleNamespace

    import cellrna_pipeline.core.segmentation.train as train_module

    seen = []

    def record(config, out, **kwargs):
        seen.append((config, kwargs["command"]))
        return SimpleNamespace(steps=config.steps, steps_per_s=1.0, seconds=1.0), None

    monkeypatch.setattr(train_module, "run_training", record)
    monkeypatch.setenv("CELLRNA_HOME", str(tmp_path / "home"))
    return seen


def test_train_cells_recipe_trains_a_recorded_config_again(capsys, tmp_path, monkeypatch):
    from cellrna_pipeline.core.segmentation.model import (
        MaskRCNNConfig,
        build_model,
        save_model_folder,
    )
    from cellrna_pipeline.core.segmentation.train import DatasetConfig, TrainConfig

    recorded = TrainConfig(
        steps=7,
        learning_rate=1e-3,
        model=MaskRCNNConfig(fpn_channels=32, input_size_px=64, box_head_dim=32),
        data=DatasetConfig(n_volumes=5, seed=3),
    )
    folder = tmp_path / "parent"
    save_model_folder(
        build_model(recorded.model),
        folder,
        training={"train_config": recorded.model_dump(mode="json")},
    )
    (tmp_path / "recipe.json").write_text(recorded.model_dump_json())
    seen = _capture_training(monkeypatch, tmp_path)
    for recipe in (folder, folder / "config.json", tmp_path / "recipe.json"):
        assert _run(capsys, "train", "cells", "--recipe", recipe)[0] == 0
        assert seen[-1][0] == recorded
        assert seen[-1][1] == f"cellrna train cells --recipe {recipe}"
    # options given on the command line override the recipe, the rest is kept
    code, _, err = _run(capsys, "train", "cells", "--recipe", folder, "--steps", 2, "--seed", 4)
    assert code == 0, err
    config = seen[-1][0]
    assert (config.steps, config.seed, config.data.seed) == (2, 4, 4)
    assert config.learning_rate == 1e-3 and config.model == recorded.model
    assert config.data.n_volumes == 5


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "no such file"),
        ("{not json", "not JSON"),
        ('{"kind": "cellrna-cell-maskrcnn", "model": {}}', "records no training config"),
        ('{"steps": 0}', "steps"),
        ('{"stepz": 10}', "stepz"),
    ],
)
def test_train_cells_bad_recipe_is_one_line(capsys, tmp_path, monkeypatch, content, match):
    seen = _capture_training(monkeypatch, tmp_path)
    recipe = tmp_path / "recipe.json"
    if content is not None:
        recipe.write_text(content)
    code, _, err = _run(capsys, "train", "cells", "--recipe", recipe)
    assert code == 2 and err.count("\n") == 1 and match in err and recipe.name in err, err
    assert not seen


def test_train_spots_without_the_spot_trainer_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cellrna_pipeline.core.spots.maskrcnn", None)  # import fails
    code, _, err = _run(capsys, "train", "spots", "--steps", 1)
    assert code == 2 and "spot model training is not available" in err


def test_train_bad_options(capsys):
    assert _run(capsys, "train", "cells", "--steps", 0)[0] == 2
    assert _run(capsys, "train", "cells", "--promote")[0] == 2
