"""``cellrna train cells|spots|spot-embedding [--steps N] [--register]``: train a model.

``cells`` trains the cell Mask R-CNN on synthetic data (``--recipe
model_registry/cell-maskrcnn`` reproduces the shipped champion) and writes a model folder; ``--register`` logs the run to the data root's
MLflow and registers the model as ``challenger`` of ``cellrna-cell-maskrcnn``;
``--promote`` also makes it ``champion`` if it beats the current one on unseen
validation volumes. ``spots`` calls the RNA-spot model's trainer
(``cellrna_pipeline.core.spots.maskrcnn.train_spot_model``). ``spot-embedding`` trains
the spot tracker's appearance embedding on the generator's live-RNA mode
(``cellrna_pipeline.core.tracking.embedding_train``; the defaults reproduce the shipped
``model_registry/spot-embedding``); ``--register`` registers it as
``cellrna-spot-embedding``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from cellrna_pipeline.core.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the cell or spot segmentation model or the spot embedding (optionally "
        "register it in MLflow)",
        description="Train a Mask R-CNN (cells, spots) or the spot tracker's appearance "
        "embedding (spot-embedding) from scratch on the synthetic generator. Long: shows progress.",
    )
    p.add_argument("target", choices=("cells", "spots", "spot-embedding"), help="which model")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's)")
    p.add_argument("--seed", type=int, help="random seed (default 0, or the recipe's)")
    p.add_argument("--volumes", type=int, help="cells: synthetic training volumes (default 64)")
    p.add_argument(
        "--nuclei-volumes",
        type=int,
        help="cells: dense-nuclei training volumes (nucleus-only, touching nuclei; default 112)",
    )
    p.add_argument(
        "--z-context",
        type=int,
        choices=(0, 1, 2, 3),
        help="cells: neighbouring z-slices per side fed with each slice (default: the recipe's)",
    )
    p.add_argument(
        "--recipe",
        metavar="FILE",
        help="cells: start from this training config (a TrainConfig JSON, or a model folder "
        "whose recorded recipe is trained again) instead of the default recipe; the options "
        "above override it",
    )
    p.add_argument(
        "--init",
        metavar="MODEL_DIR",
        help="cells: start from this model folder's weights (fine-tuning) instead of from scratch",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="cells: processes that synthesize the data and augment the batches (default 0: "
        "in-process; a few keep a GPU busy)",
    )
    p.add_argument(
        "--register", action="store_true", help="log to MLflow and register as 'challenger'"
    )
    p.add_argument(
        "--promote",
        action="store_true",
        help="with --register: make it 'champion' if it beats the current one",
    )
    p.add_argument(
        "--out", help="model folder to write (default: $CELLRNA_HOME/models/<name>-<time>)"
    )
    p.add_argument("--home", help="data root (default: $CELLRNA_HOME, else ./cellrna_home)")
    p.set_defaults(func=run)


def _progress(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps must be >= 1, got {args.steps}")
    if args.volumes is not None and args.volumes < 1:
        raise InputError(f"--volumes must be >= 1, got {args.volumes}")
    if args.nuclei_volumes is not None and args.nuclei_volumes < 0:
        raise InputError(f"--nuclei-volumes must be >= 0, got {args.nuclei_volumes}")
    if args.workers < 0:
        raise InputError(f"--workers must be >= 0, got {args.workers}")
    if args.promote and not args.register:
        raise InputError("--promote needs --register")
    cells_only = {
        "--volumes": args.volumes,
        "--nuclei-volumes": args.nuclei_volumes,
        "--z-context": args.z_context,
        "--recipe": args.recipe,
        "--init": args.init,
        "--workers": args.workers or None,
    }
    given = [name for name, value in cells_only.items() if value is not None]
    if args.target != "cells" and given:
        raise InputError(f"{', '.join(given)}: for cells only, not for {args.target}")
    if args.target == "spot-embedding":
        if args.promote:
            raise InputError("--promote is for cells only")
        return _train_spot_embedding(args)
    if args.target == "spots":
        if args.promote:
            raise InputError(
                "--promote is implemented for cells only; spot models are promoted by their own check"
            )
        return _train_spots(args)
    return _train_cells(args)


def _out_dir(args: argparse.Namespace, root: Any, name: str):
    from pathlib import Path

    if args.out:
        return Path(args.out)
    return root.home / "models" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _train_cells(args: argparse.Namespace) -> int:
    from cellrna_pipeline.core.paths import DataRoot
    from cellrna_pipeline.core.segmentation.train import (
        DatasetConfig,
        TrainConfig,
        read_recipe,
        run_training,
    )

    root = DataRoot.from_env(args.home)
    if args.init is not None:
        from cellrna_pipeline.core.segmentation.model import read_model_config

        read_model_config(args.init)  # a one-line error now, not after making the data
    base = read_recipe(args.recipe) if args.recipe is not None else TrainConfig()
    data: dict[str, Any] = {}
    val: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    if args.seed is not None:
        data["seed"] = fields["seed"] = args.seed
    if args.volumes is not None:
        data["n_volumes"] = args.volumes
        val["n_volumes"] = max(1, min(4, args.volumes // 8))
    if args.nuclei_volumes is not None:
        data["n_nuclei_volumes"] = args.nuclei_volumes
        val["n_nuclei_volumes"] = min(base.val_data.n_nuclei_volumes, args.nuclei_volumes)
    if args.init is not None:
        fields["init_from"] = args.init
    if args.steps is not None:
        fields["steps"] = args.steps
    if args.z_context is not None:
        fields["model"] = base.model.model_copy(update={"z_context": args.z_context})
    fields["data"] = DatasetConfig(**{**base.data.model_dump(), **data})
    fields["val_data"] = DatasetConfig(**{**base.val_data.model_dump(), **val})
    config = TrainConfig(**{**base.model_dump(), **fields})
    out = _out_dir(args, root, "cell-maskrcnn")
    command = (
        "cellrna train cells"
        + (f" --steps {args.steps}" if args.steps else "")
        + (f" --recipe {args.recipe}" if args.recipe else "")
        + (f" --seed {args.seed}" if args.seed is not None else "")
        + (f" --volumes {args.volumes}" if args.volumes else "")
        + (f" --nuclei-volumes {args.nuclei_volumes}" if args.nuclei_volumes is not None else "")
        + (f" --z-context {args.z_context}" if args.z_context is not None else "")
        + (f" --init {args.init}" if args.init else "")
        + (f" --workers {args.workers}" if args.workers else "")
    )
    registry, run_id, callbacks = None, None, []
    if args.register:
        from cellrna_pipeline.integrations.mlflow_registry import (
            MlflowRegistry,
            MlflowTrainingLogger,
        )

        registry = MlflowRegistry.for_data_root(root)
        run_id = registry.start_run(
            "cellrna-cell-training", run_name=command, params=config.model_dump(mode="json")
        )
        callbacks.append(MlflowTrainingLogger(registry, run_id))
    root.home.mkdir(parents=True, exist_ok=True)
    result, folder = run_training(
        config,
        out,
        cache_dir=root.home / "training_data",
        callbacks=callbacks,
        progress=_progress,
        command=command,
        workers=args.workers,
    )
    print(
        f"wrote {folder} ({result.steps} steps, {result.steps_per_s:.2f} steps/s, {result.seconds / 60:.1f} min)"
    )
    if registry is not None and run_id is not None and folder is not None:
        from cellrna_pipeline.integrations.mlflow_registry import CELL_MODEL, CHALLENGER

        version = registry.log_model_folder(
            folder, CELL_MODEL, run_id=run_id, aliases=(CHALLENGER,)
        )
        registry.client.set_terminated(run_id)
        print(
            f"registered {CELL_MODEL} version {version.version} as '{CHALLENGER}' (MLflow run {run_id})"
        )
        if args.promote:
            from cellrna_pipeline.core.segmentation.evaluate import (
                compare_models,
                promotion_volumes,
            )
            from cellrna_pipeline.core.segmentation.model import load_model_folder

            champion = load_model_folder(registry.load_model_folder(CELL_MODEL).path)
            volumes, nuclei = promotion_volumes()
            comparison = compare_models(result.model, champion, volumes, nuclei_volumes=nuclei)
            verdict = f"challenger {comparison.challenger_score:.4f} vs champion {comparison.champion_score:.4f}"
            if comparison.challenger_wins:
                registry.promote(CELL_MODEL, version.version)
                print(f"promoted version {version.version} to 'champion' ({verdict})")
            else:
                print(f"kept the champion ({verdict})")
    return 0


def _train_spots(args: argparse.Namespace) -> int:
    import importlib
    from pathlib import Path

    from cellrna_pipeline.core.paths import DataRoot

    try:
        module = importlib.import_module("cellrna_pipeline.core.spots.maskrcnn")
    except ImportError as exc:
        raise InputError(
            f"spot model training is not available in this installation ({exc.__class__.__name__}: {exc})"
        ) from None
    train_spot_model = getattr(module, "train_spot_model", None)
    if train_spot_model is None:
        raise InputError(
            "cellrna_pipeline.core.spots.maskrcnn has no train_spot_model(); cannot train spots"
        )
    root = DataRoot.from_env(args.home)
    fields: dict[str, Any] = {"seed": args.seed or 0}
    if args.steps is not None:
        fields["steps"] = args.steps
    config_cls = getattr(module, "SpotTrainConfig", None) or getattr(module, "TrainConfig", None)
    config: Any = config_cls(**fields) if config_cls is not None else fields
    result = train_spot_model(config, progress=_progress)
    folder = result if isinstance(result, str | Path) else getattr(result, "folder", None)
    print(f"trained the spot model{f': {folder}' if folder else ''}")
    if args.register:
        if folder is None:
            raise InputError("train_spot_model returned no model folder; cannot register it")
        from cellrna_pipeline.integrations.mlflow_registry import (
            CHALLENGER,
            RNA_MODEL,
            MlflowRegistry,
        )

        registry = MlflowRegistry.for_data_root(root)
        version = registry.log_model_folder(
            Path(folder), RNA_MODEL, experiment="cellrna-rna-training", aliases=(CHALLENGER,)
        )
        print(f"registered {RNA_MODEL} version {version.version} as '{CHALLENGER}'")
    return 0


SPOT_EMBEDDING_MODEL = "cellrna-spot-embedding"


def _train_spot_embedding(args: argparse.Namespace) -> int:
    from cellrna_pipeline.core.paths import DataRoot
    from cellrna_pipeline.core.tracking.embedding_train import (
        EmbeddingTrainConfig,
        train_spot_embedding,
    )

    root = DataRoot.from_env(args.home)
    fields: dict[str, Any] = {"seed": args.seed or 0}
    if args.steps is not None:
        fields["steps"] = args.steps
    config = EmbeddingTrainConfig(**fields)
    out = _out_dir(args, root, "spot-embedding")
    command = (
        "cellrna train spot-embedding"
        + (f" --steps {args.steps}" if args.steps else "")
        + (f" --seed {args.seed}" if args.seed else "")
    )
    result = train_spot_embedding(config, out, progress=_progress, command=command)
    print(
        f"wrote {result.folder} ({config.steps} steps, {result.seconds / 60:.1f} min; "
        f"validation top-1 position {result.metrics.get('top1_position', float('nan')):.4f}, "
        f"position + embedding {result.metrics.get('top1_joint', float('nan')):.4f})"
    )
    if args.register:
        from cellrna_pipeline.integrations.mlflow_registry import CHALLENGER, MlflowRegistry

        registry = MlflowRegistry.for_data_root(root)
        version = registry.log_model_folder(
            out,
            SPOT_EMBEDDING_MODEL,
            experiment="cellrna-spot-embedding-training",
            aliases=(CHALLENGER,),
        )
        print(f"registered {SPOT_EMBEDDING_MODEL} version {version.version} as '{CHALLENGER}'")
    return 0
