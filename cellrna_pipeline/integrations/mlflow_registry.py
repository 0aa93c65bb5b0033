"""MLflow tracking and model registry, embedded by default under the data root.

Default store (``DataRoot.mlruns``)::

    $CELLRNA_HOME/mlruns/
      mlflow.db          tracking + registry (SQLite)
      artifacts/         run artifacts (every experiment is created with this location)
      cache/<name>/v<N>/ downloaded model folders
      .lock              serialises first-use imports and promotions across processes

A server can be used instead by setting ``CELLRNA_MLFLOW_TRACKING_URI`` (the registry follows
it). MLflow's own ``MLFLOW_TRACKING_URI`` is deliberately not read: MLflow sets it as a
side effect of ``mlflow.set_tracking_uri`` in-process, which would silently redirect us.

Models are **model folders** (``config.json``, ``weights.pt`` state_dict, ``model_card.md``,
``metrics.json``), logged as an MLflow pyfunc model whose artifact ``model_dir`` is that
folder (no pickled torch module: MLflow's default ``torch.export`` fails on Mask R-CNN).
Registered names: ``cellrna-cell-maskrcnn`` and ``cellrna-rna-maskrcnn``; alias
``champion`` is what inference loads (``models:/<name>@champion``), ``challenger`` a
candidate waiting for its promotion check. When a name has no champion yet, the folder
shipped in the repository's ``model_registry/<cell|rna>-maskrcnn/`` is imported and made
champion on first use.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.paths import DataRoot

CELL_MODEL = "cellrna-cell-maskrcnn"
RNA_MODEL = "cellrna-rna-maskrcnn"
CHAMPION = "champion"
CHALLENGER = "challenger"
SHIPPED_FOLDERS = {CELL_MODEL: "cell-maskrcnn", RNA_MODEL: "rna-maskrcnn"}
"""Registered name -> folder under ``model_registry/``."""
MODEL_DIR_ARTIFACT = "model_dir"
SHIPPED_ENV = "CELLRNA_MODEL_REGISTRY"
TRACKING_ENV = "CELLRNA_MLFLOW_TRACKING_URI"

_URI_LOCK = threading.Lock()


def shipped_models_dir() -> Path:
    """The repository's ``model_registry/`` (or ``$CELLRNA_MODEL_REGISTRY``)."""
    env = os.environ.get(SHIPPED_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "model_registry"


def shipped_model_folder(name: str) -> Path:
    """The shipped folder of a registered name; :class:`InputError` if there is none."""
    if name not in SHIPPED_FOLDERS:
        raise InputError(f"no shipped model for {name!r}; known: {sorted(SHIPPED_FOLDERS)}")
    folder = shipped_models_dir() / SHIPPED_FOLDERS[name]
    if not (folder / "config.json").exists():
        raise InputError(f"no shipped model at {folder} (config.json missing)")
    return folder


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered model version."""

    name: str
    version: str
    run_id: str | None
    source: str
    aliases: tuple[str, ...] = ()

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class LoadedModelFolder:
    """A model folder made available locally, and the version it came from."""

    path: Path
    version: ModelVersionInfo

    def read_config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())


def _make_pyfunc_class() -> type:
    """Define :class:`ModelFolderPyfunc` on first use (mlflow is imported only then)."""
    import mlflow.pyfunc

    class ModelFolderPyfunc(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined,misc]
        """pyfunc wrapper of a model folder (artifact ``model_dir``).

        ``predict`` works for cell models: input ``(c, z, y, x)`` or ``(c, y, x)`` with
        channels nucleus, cytoplasm; output the cell labels. Pipelines load the folder
        itself (see :meth:`MlflowRegistry.load_model_folder`).
        """

        def load_context(self, context: Any) -> None:
            self.folder = Path(context.artifacts[MODEL_DIR_ARTIFACT])
            self._model: Any = None

        def predict(self, context: Any, model_input: np.ndarray, params: Any = None) -> Any:
            # np.ndarray: a hint MLflow infers no schema from (and does not warn about)
            config = json.loads((self.folder / "config.json").read_text())
            if config.get("kind") != CELL_MODEL:
                raise NotImplementedError(
                    f"pyfunc predict is not implemented for {config.get('kind')!r}"
                )
            from cellrna_pipeline.core.segmentation import segment_cells
            from cellrna_pipeline.core.segmentation.model import load_model_folder

            if self._model is None:
                self._model = load_model_folder(self.folder)
            data = np.asarray(model_input)
            seg = segment_cells(data[0], data[1] if data.shape[0] > 1 else None, model=self._model)
            return seg.cells

    ModelFolderPyfunc.__module__ = __name__
    ModelFolderPyfunc.__qualname__ = "ModelFolderPyfunc"
    globals()["ModelFolderPyfunc"] = ModelFolderPyfunc
    return ModelFolderPyfunc


def _pyfunc_class() -> type:
    cls = globals().get("ModelFolderPyfunc")
    return cls if cls is not None else _make_pyfunc_class()


def __getattr__(name: str) -> Any:
    # ModelFolderPyfunc is created lazily so that importing this module stays cheap; pickles
    # of it (MLflow's python_model.pkl) resolve it by name through here.
    if name == "ModelFolderPyfunc":
        return _pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class MlflowRegistry:
    """Tracking + registry client bound to one store (no global MLflow state leaks).

    Parameters
    ----------
    root : folder of the embedded store (``DataRoot.mlruns``).
    tracking_uri : use this instead of the embedded SQLite store (default:
        ``$CELLRNA_MLFLOW_TRACKING_URI`` if set, else embedded).
    """

    def __init__(self, root: str | os.PathLike[str], *, tracking_uri: str | None = None) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        self.root = Path(root).absolute()
        self.tracking_uri = (
            tracking_uri or os.environ.get(TRACKING_ENV) or (f"sqlite:///{self.root / 'mlflow.db'}")
        )
        self._client: Any = None
        self._lock_depth = 0

    @classmethod
    def for_data_root(cls, root: DataRoot) -> MlflowRegistry:
        """The registry of a data root (``$CELLRNA_HOME/mlruns``)."""
        return cls(root.mlruns)

    @property
    def artifact_location(self) -> str:
        return (self.root / "artifacts").as_uri()

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self.root.mkdir(parents=True, exist_ok=True)
            with self.lock():  # two processes must not create the SQLite schema at once
                client = MlflowClient(
                    tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri
                )
                client.search_experiments(max_results=1)  # creates/migrates the store now
            self._client = client
        return self._client

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive lock of this store across processes (imports, promotions);
        re-entrant within one registry object."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def active_uris(self) -> Iterator[None]:
        """Point MLflow's global tracking/registry URIs at this store while inside (for
        ``mlflow.pyfunc.load_model("models:/...")`` and other global-state APIs); the URIs
        and the ``MLFLOW_*_URI`` variables that MLflow sets as a side effect are restored."""
        import mlflow

        keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
        with _URI_LOCK:
            saved_env = {k: os.environ.get(k) for k in keys}
            old_t, old_r = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.set_registry_uri(self.tracking_uri)
            try:
                yield
            finally:
                mlflow.set_tracking_uri(old_t)
                mlflow.set_registry_uri(old_r)
                for key, value in saved_env.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value

    # --- experiments and runs ---------------------------------------------------------

    def experiment_id(self, name: str) -> str:
        """Id of an experiment, created (with the store's artifact location) if missing."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(
                name, artifact_location=f"{self.artifact_location}/{name}"
            )
        except MlflowException:  # created concurrently
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def start_run(
        self,
        experiment: str,
        *,
        run_name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Create a run and log ``params``; returns the run id."""
        run = self.client.create_run(
            self.experiment_id(experiment), run_name=run_name, tags=dict(tags or {})
        )
        for key, value in _flat(params or {}).items():
            self.client.log_param(run.info.run_id, key[:250], str(value)[:6000])
        return run.info.run_id

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, Any], *, step: int | None = None
    ) -> None:
        """Log numeric entries of ``metrics`` (nested dicts flattened with ``.``)."""
        for key, value in _flat(metrics).items():
            if isinstance(value, int | float) and not isinstance(value, bool) and value == value:
                self.client.log_metric(run_id, key, float(value), step=step or 0)

    # --- models ------------------------------------------------------------------------

    def log_model_folder(
        self,
        folder: str | os.PathLike[str],
        name: str,
        *,
        run_id: str | None = None,
        experiment: str = "cellrna-models",
        aliases: tuple[str, ...] = (),
        description: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> ModelVersionInfo:
        """Log a model folder as a pyfunc model and register it as a new version of ``name``.

        ``metrics.json`` entries are logged as run metrics; ``model_card.md`` becomes the
        version's description unless ``description`` is given. A new run is made in
        ``experiment`` when ``run_id`` is ``None``.
        """
        import mlflow.pyfunc
        from mlflow.exceptions import MlflowException

        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise InputError(f"{folder} is not a model folder (no config.json)")
        own_run = run_id is None
        if run_id is None:
            run_id = self.start_run(experiment, run_name=f"register {name}", tags=tags)
        metrics_path = folder / "metrics.json"
        if metrics_path.exists():
            self.log_metrics(run_id, json.loads(metrics_path.read_text()))
        with tempfile.TemporaryDirectory() as tmp:
            # copied under a fixed name: MLflow stores an artifact under its basename
            staged = Path(tmp) / MODEL_DIR_ARTIFACT
            shutil.copytree(folder, staged)
            packaged = Path(tmp) / "model"
            # MLflow scans every installed distribution to warn about requirement
            # mismatches (seconds per process); meaningless for our own wrapper: skip it.
            with mock.patch("mlflow.utils.environment.warn_dependency_requirement_mismatches"):
                mlflow.pyfunc.save_model(
                    path=str(packaged),
                    python_model=_pyfunc_class()(),
                    artifacts={MODEL_DIR_ARTIFACT: str(staged)},
                    pip_requirements=["cellrna-pipeline"],
                )
            self.client.log_artifacts(run_id, str(packaged), "model")
        if own_run:
            self.client.set_terminated(run_id)
        run = self.client.get_run(run_id)
        with contextlib.suppress(MlflowException):  # it exists
            self.client.create_registered_model(name)
        card = folder / "model_card.md"
        desc = (
            description
            if description is not None
            else (card.read_text()[:5000] if card.exists() else "")
        )
        mv = self.client.create_model_version(
            name,
            source=f"{run.info.artifact_uri}/model",
            run_id=run_id,
            description=desc,
            tags=dict(tags or {}),
        )
        for alias in aliases:
            self.client.set_registered_model_alias(name, alias, mv.version)
        return self._info(name, str(mv.version))

    def _info(self, name: str, version: str) -> ModelVersionInfo:
        mv = self.client.get_model_version(name, version)
        return ModelVersionInfo(
            name=name,
            version=str(mv.version),
            run_id=mv.run_id,
            source=mv.source,
            aliases=tuple(mv.aliases or ()),
        )

    def get_version(self, name: str, alias: str = CHAMPION) -> ModelVersionInfo | None:
        """The version holding ``alias``, or ``None`` (also when the name is unknown)."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None
        return self._info(name, str(mv.version))

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def delete_alias(self, name: str, alias: str) -> None:
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException):
            self.client.delete_registered_model_alias(name, alias)

    def promote(self, name: str, version: str) -> None:
        """Make ``version`` the champion; the old champion keeps alias ``previous-champion``."""
        with self.lock():
            old = self.get_version(name, CHAMPION)
            if old is not None and old.version != str(version):
                self.set_alias(name, "previous-champion", old.version)
            self.set_alias(name, CHAMPION, str(version))
            current = self.get_version(name, CHALLENGER)
            if current is not None and current.version == str(version):
                self.delete_alias(name, CHALLENGER)

    def ensure_champion(self, name: str) -> ModelVersionInfo:
        """The champion of ``name``, importing the shipped folder as champion if none."""
        found = self.get_version(name, CHAMPION)
        if found is not None:
            return found
        with self.lock():
            found = self.get_version(name, CHAMPION)  # another process may have won
            if found is not None:
                return found
            folder = shipped_model_folder(name)
            return self.log_model_folder(
                folder,
                name,
                aliases=(CHAMPION,),
                tags={"origin": "shipped", "shipped_folder": str(folder)},
                run_id=self.start_run(
                    "cellrna-models",
                    run_name=f"import shipped {folder.name}",
                    tags={"origin": "shipped"},
                ),
            )

    def load_model_folder(
        self, name: str, alias: str = CHAMPION, *, import_shipped: bool = True
    ) -> LoadedModelFolder:
        """Resolve ``models:/<name>@<alias>``, download that version (cached per version) and
        return its folder.

        With ``import_shipped`` and no champion yet, the shipped folder is imported first.

        Raises
        ------
        InputError
            No such version (and nothing shipped to import).
        """
        if import_shipped and alias == CHAMPION:
            info = self.ensure_champion(name)
        else:
            found = self.get_version(name, alias)
            if found is None:
                raise InputError(
                    f"no model version of {name!r} has alias {alias!r} in {self.tracking_uri}"
                )
            info = found
        cache = self.root / "cache" / name / f"v{info.version}"
        folder = cache / "model" / "artifacts" / MODEL_DIR_ARTIFACT
        if not (folder / "config.json").exists():
            import mlflow.artifacts

            from cellrna_pipeline.core.io import atomic_dir

            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_dir(cache, exist_ok=True) as tmp:
                # the alias was resolved above (models:/<name>@<alias> -> version); fetch that
                # version's source without touching MLflow's global URIs
                mlflow.artifacts.download_artifacts(
                    artifact_uri=info.source,
                    dst_path=str(tmp),
                    tracking_uri=self.tracking_uri,
                )
        if not (folder / "config.json").exists():
            raise InputError(f"{info.uri} holds no model folder (artifact {MODEL_DIR_ARTIFACT!r})")
        return LoadedModelFolder(path=folder, version=info)


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out


class MlflowTrainingLogger:
    """Training callback (see ``core.segmentation.train.TrainCallback``) logging to a run."""

    def __init__(self, registry: MlflowRegistry, run_id: str, *, every: int = 25) -> None:
        self.registry = registry
        self.run_id = run_id
        self.every = every

    def on_step(self, step: int, losses: dict[str, float], seconds: float) -> None:
        if step % self.every == 0 or step == 1:
            self.registry.log_metrics(
                self.run_id, {**losses, "seconds_per_step": seconds}, step=step
            )

    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        self.registry.log_metrics(self.run_id, metrics, step=step)
