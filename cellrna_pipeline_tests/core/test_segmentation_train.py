"""Training: synthetic slices, COCO round trip, augmentation, the loop with checkpoints,
and DDP with torchrun (2 CPU processes, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cellrna_pipeline.core.segmentation.model import MaskRCNNConfig, load_model_folder
from cellrna_pipeline.core.segmentation.train import (
    AugmentConfig,
    DatasetConfig,
    TrainConfig,
    augment,
    export_coco,
    import_coco,
    make_samples,
    make_target,
    train_model,
)

TINY_MODEL = MaskRCNNConfig(
    fpn_channels=32,
    input_size_px=64,
    box_head_dim=64,
    mask_head_channels=32,
    mask_head_layers=1,
    semantic_channels=16,
)
TINY_DATA = DatasetConfig(n_volumes=1, seed=5, shape_zyx=(6, 64, 64), empty_slices_per_volume=1)


@pytest.fixture(scope="module")
def samples():
    return make_samples(TINY_DATA, canonical_px=12.0)


def test_samples_are_deterministic_and_consistent(samples):
    again = make_samples(TINY_DATA, canonical_px=12.0)
    assert len(samples) == len(again) >= 2
    for a, b in zip(samples, again, strict=True):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.cells, b.cells)
        assert a.image.shape[0] == 2 and a.image.shape[1:] == a.cells.shape
        inside = a.nuclei > 0
        assert (a.cells[inside] == a.nuclei[inside]).all()
    assert any(not s.cells.any() for s in samples)  # an empty slice is kept


def test_worker_processes_make_the_same_samples_and_feed_training(samples):
    data = TINY_DATA.model_copy(update={"n_nuclei_volumes": 1, "nuclei_slices_per_volume": 2})
    serial = make_samples(data, canonical_px=12.0)
    parallel = make_samples(data, canonical_px=12.0, workers=2)
    assert [s.source for s in parallel] == [s.source for s in serial]
    assert [s.kind for s in serial].count("nuclei") == 2
    for a, b in zip(serial, parallel, strict=True):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.cells, b.cells)
    config = TrainConfig(steps=2, batch_size=2, warmup_steps=1, model=TINY_MODEL, data=TINY_DATA)
    result = train_model(config, train_samples=samples, workers=2)
    assert len(result.history) == 2 and all(np.isfinite(h["loss"]) for h in result.history)


def test_layer_volumes_add_out_of_focus_samples_and_leave_the_others_unchanged():
    from cellrna_pipeline.core.segmentation.train import _random_nuclei_config

    for i in range(4):  # probability 0: the earlier settings, draw for draw
        earlier = _random_nuclei_config(np.random.default_rng([5, i, 2]), i)
        now = _random_nuclei_config(np.random.default_rng([5, i, 2]), i, 0.8, 0.0)
        assert now == earlier and now.layer_fraction == 1.0
    data = DatasetConfig(
        n_volumes=0,
        n_nuclei_volumes=1,
        nuclei_slices_per_volume=3,
        seed=5,
        nuclei_layer_probability=1.0,
        empty_slices_per_volume=2,
    )
    layered = make_samples(data, canonical_px=12.0)
    assert len(layered) == 5 and sum(not s.cells.any() for s in layered) == 2
    assert all(s.kind == "nuclei" and s.image[0].any() for s in layered)


def test_coco_round_trip(samples, tmp_path):
    folder = export_coco(samples, tmp_path / "coco")
    coco = json.loads((folder / "annotations.json").read_text())
    assert {c["name"] for c in coco["categories"]} == {"cell", "nucleus"}
    back = import_coco(folder)
    for a, b in zip(samples, back, strict=True):
        assert np.array_equal(a.cells, b.cells) and np.array_equal(a.nuclei, b.nuclei)
        assert np.allclose(a.image, b.image, atol=2e-3 * max(1.0, float(np.abs(a.image).max())))


def test_augment_modes_and_targets(samples):
    rng = np.random.default_rng(0)
    full = next(s for s in samples if s.cells.any())
    only_nucleus = AugmentConfig(nucleus_only_probability=1.0)
    img, inst, sem = augment(full, rng, tile_px=64, config=only_nucleus)
    assert img.shape == (2, 64, 64) and inst.shape == sem.shape == (64, 64)
    assert not img[1].any() and not (sem == 2).any()  # cell channel dropped: nuclei are the objects
    img, inst, sem = augment(
        full,
        rng,
        tile_px=64,
        config=AugmentConfig(nucleus_only_probability=0.0, cell_only_probability=0.0),
    )
    target = make_target(inst, sem)
    assert target["masks"].shape[0] == target["boxes"].shape[0] == target["labels"].shape[0]
    boxes = target["boxes"].numpy()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


@pytest.fixture(scope="module")
def nuclei_samples():
    data = DatasetConfig(n_volumes=0, n_nuclei_volumes=1, nuclei_slices_per_volume=3, seed=5)
    return make_samples(data, canonical_px=12.0)


def test_dense_nuclei_samples_are_nucleus_only_and_round_trip(nuclei_samples, tmp_path):
    assert len(nuclei_samples) == 3
    for s in nuclei_samples:
        assert s.kind == "nuclei" and s.cells.any()
        assert s.image[0].any() and not s.image[1].any()  # no cell stain
        assert np.array_equal(s.cells, s.nuclei)
    back = import_coco(export_coco(nuclei_samples, tmp_path / "coco"))
    assert [s.kind for s in back] == ["nuclei"] * 3
    assert all(np.array_equal(a.cells, b.cells) for a, b in zip(nuclei_samples, back, strict=True))


def test_augment_never_drops_the_only_stain_of_nuclei_samples(nuclei_samples):
    rng = np.random.default_rng(1)
    cell_only = AugmentConfig(nucleus_only_probability=0.0, cell_only_probability=1.0)
    for _ in range(4):
        img, inst, sem = augment(nuclei_samples[1], rng, tile_px=64, config=cell_only)
        assert img[0].any() and not img[1].any()
        assert set(np.unique(sem)) <= {0, 1}  # nuclei only: no cytoplasm class
        assert ((inst > 0) == (sem == 1)).all()


def test_init_from_a_model_folder(samples, tmp_path):
    from cellrna_pipeline.core.errors import InputError
    from cellrna_pipeline.core.segmentation.model import build_model, save_model_folder

    torch.manual_seed(3)
    start = save_model_folder(build_model(TINY_MODEL), tmp_path / "start", half=False)
    config = TrainConfig(
        steps=1, batch_size=1, model=TINY_MODEL, data=TINY_DATA, init_from=str(start)
    )
    zero_lr = config.model_copy(update={"learning_rate": 0.0})
    result = train_model(zero_lr, train_samples=samples)
    loaded = load_model_folder(start).state_dict()
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, loaded[k]), k  # started from those weights (lr 0: unchanged)
    other = TINY_MODEL.model_copy(update={"fpn_channels": 16})
    with pytest.raises(InputError, match="do not fit"):
        train_model(config.model_copy(update={"model": other}), train_samples=samples)


def test_fine_tuned_model_folder_records_its_start_and_regenerates_its_card(tmp_path):
    from cellrna_pipeline.core.segmentation.model import build_model, save_model_folder
    from cellrna_pipeline.core.segmentation.train import (
        INIT_RECIPE_FILE,
        read_recipe,
        run_training,
        write_model_card,
    )

    base = TrainConfig(
        steps=1, batch_size=1, model=TINY_MODEL, data=TINY_DATA, val_data=TINY_DATA, val_slices=1
    )
    parent = base.model_copy(update={"steps": 5})
    start = save_model_folder(
        build_model(TINY_MODEL),
        tmp_path / "start",
        training={"train_config": parent.model_dump(mode="json")},
    )
    command = f"cellrna train cells --init {start}"
    _, folder = run_training(
        base.model_copy(update={"init_from": str(start)}), tmp_path / "tuned", command=command
    )
    assert folder is not None
    assert read_recipe(folder / INIT_RECIPE_FILE) == parent  # how to make the start again
    assert read_recipe(folder).init_from == str(start)
    card = (folder / "model_card.md").read_text()
    assert (
        f"--recipe THIS_FOLDER/{INIT_RECIPE_FILE} --out INIT  # the starting weights: 5 steps from scratch"
        in card
    )
    assert f"cellrna train cells --recipe THIS_FOLDER --init INIT  # run as: {command}" in card
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["benchmark_synth"] = {"cells_ap50": 0.5, "iou_nucleus": 0.25}
    metrics["benchmark_commands"] = {"synth": "python benchmarks/cells.py --record"}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    card = write_model_card(folder).read_text()
    assert "| synth | 0.500 | - | - | 0.250 | - | - |" in card
    assert "- `python benchmarks/cells.py --record`: synth" in card


def test_train_loop_checkpoints_and_resumes(samples, tmp_path):
    events = []

    class Recorder:
        def on_step(self, step, losses, seconds):
            events.append(("step", step, losses["loss"]))

        def on_validation(self, step, metrics):
            events.append(("val", step, metrics["val_ap50"]))

    config = TrainConfig(
        steps=2,
        batch_size=1,
        warmup_steps=1,
        validate_every=2,
        checkpoint_every=1,
        val_slices=2,
        model=TINY_MODEL,
        data=TINY_DATA,
    )
    result = train_model(
        config,
        train_samples=samples,
        val_samples=samples,
        checkpoint_dir=tmp_path,
        callbacks=[Recorder()],
    )
    assert [e[1] for e in events if e[0] == "step"] == [1, 2]
    assert all(np.isfinite(e[2]) for e in events)
    assert [e[0] for e in events].count("val") == 1 and 0.0 <= result.metrics["val_ap50"] <= 1.0
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["step"] == 2
    resumed = train_model(
        config.model_copy(update={"steps": 3}), train_samples=samples, checkpoint_dir=tmp_path
    )
    assert len(resumed.history) == 1 and resumed.history[0]["step"] == 3


@pytest.mark.slow
def test_ddp_with_torchrun_two_cpu_processes(tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo): both ranks train, rank 0 writes the model."""
    config = TrainConfig(
        steps=2,
        batch_size=1,
        warmup_steps=1,
        validate_every=2,
        checkpoint_every=2,
        val_slices=2,
        model=TINY_MODEL,
        data=TINY_DATA,
        val_data=TINY_DATA,
    )
    (tmp_path / "config.json").write_text(config.model_dump_json())
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CELLRNA_TORCH_THREADS": "1",
        "CELLRNA_DEVICE": "cpu",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "cellrna_pipeline.core.segmentation.train",
        "--config",
        str(tmp_path / "config.json"),
        "--out",
        str(tmp_path / "model"),
        "--cache",
        str(tmp_path / "cache"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "x 2 processes" in proc.stdout
    sums = {
        line.split()[1]: line.split()[-1]
        for line in proc.stdout.splitlines()
        if "parameter checksum" in line
    }
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"]  # replicas stayed in sync
    model = load_model_folder(tmp_path / "model")
    training = json.loads((tmp_path / "model" / "config.json").read_text())["training"]
    assert training["world_size"] == 2
    assert model.config == TINY_MODEL


def test_the_default_recipe_trains_the_shipped_champions_starting_weights():
    """The champion is fine-tuned (docs/models.md): ``cellrna train cells`` with no recipe
    trains its starting weights (``init_recipe.json``), and the fine-tune differs from that
    only in its schedule, seeds and starting weights. (The starting weights were trained by
    the GPU driver, which validates and checkpoints only at the end: bookkeeping that does
    not change the weights.)"""
    from pathlib import Path

    from cellrna_pipeline.core.segmentation.train import INIT_RECIPE_FILE, read_recipe
    from cellrna_pipeline.integrations.mlflow_registry import _flat as flat

    shipped = Path(__file__).parents[2] / "model_registry" / "cell-maskrcnn"
    bookkeeping = {"validate_every": 6500, "checkpoint_every": 10**9}
    assert read_recipe(shipped / INIT_RECIPE_FILE) == TrainConfig(**bookkeeping)
    base, fine_tune = flat(TrainConfig().model_dump()), flat(read_recipe(shipped).model_dump())
    changed = {k for k in base if fine_tune[k] != base[k]}
    assert changed == {
        "steps",
        "learning_rate",
        "warmup_steps",
        "validate_every",
        "seed",
        "data.seed",
        "init_from",
    }
