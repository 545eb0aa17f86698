"""Where a model to generate with comes from: a folder, an `s3://` prefix or the MLflow registry."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from janus_lab.model.adapters import ADAPTER_CONFIG, is_adapter_folder, load_adapter_bundle
from janus_lab.model.builders import JanusBundle, debug, mini
from janus_lab.model.weights import load_pretrained
from janus_lab.storage import download_prefix, is_s3_uri

REGISTRY_SCHEME = "models:/"
DEBUG_MODEL = "debug"
"""`model=debug`: the tiny random-weight preset, for smoke runs without a checkpoint."""
MINI_MODEL = "mini"
"""`model=mini`: the trained miniature base model shipped in the repo (draws, cannot edit)."""
BUILT_IN_MODELS = {DEBUG_MODEL: debug, MINI_MODEL: mini}
"""Models named by a word instead of a checkpoint: built in memory, no download."""


def build_built_in(name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> JanusBundle:
    """`debug` or `mini`, float32 unless told otherwise."""
    return BUILT_IN_MODELS[name](dtype=dtype or torch.float32, device=device)


class ModelSourceError(ValueError):
    """A model URI that cannot be resolved to a checkpoint folder."""


def resolve_model_uri(uri: str, download_dir: str | os.PathLike | None = None) -> str:
    """Turns `models:/name@alias` (or `models:/name/version`) into a local checkpoint folder.

    Other URIs (local folders, `s3://` prefixes) are returned unchanged: `load_pretrained`
    reads them. The registry form downloads the registered version's artifacts through
    `mlflow.artifacts.download_artifacts`, from the tracking/registry server in the
    environment (MLFLOW_TRACKING_URI).

    Raises:
        ModelSourceError: mlflow is not installed, or the download holds no Hugging Face
            checkpoint folder (a `config.json`).
    """
    if not uri.startswith(REGISTRY_SCHEME):
        return uri
    try:
        import mlflow.artifacts
    except ImportError:
        raise ModelSourceError(
            f"{uri} is a model registry URI, which needs mlflow (`pip install mlflow`); "
            "or pass the checkpoint folder or s3:// prefix instead") from None
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=download_dir))
    except Exception as err:  # noqa: BLE001 - MLflow raises many types; all mean "not found here"
        raise ModelSourceError(f"could not download {uri} from the MLflow registry: {err}") from err
    return str(find_checkpoint_folder(local, uri))


MODEL_MARKERS = ("config.json", ADAPTER_CONFIG)
"""A model folder holds a Hugging Face checkpoint (config.json) or a LoRA adapter (adapter_config.json)."""


def find_checkpoint_folder(root: Path, uri: str = "") -> Path:
    """The folder holding a model in a download: the root or one level below.

    A registered model may be the export folder itself or a run's artifacts with the export
    in a subfolder (e.g. `export/`); the export is a checkpoint or an adapter.

    Raises:
        ModelSourceError: no such folder, or more than one.
    """
    if any((root / marker).exists() for marker in MODEL_MARKERS):
        return root
    found = sorted({path.parent for marker in MODEL_MARKERS for path in root.glob(f"*/{marker}")})
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise ModelSourceError(f"{uri or root} holds {what} model folders (config.json or adapter_config.json)"
                               + (f": {', '.join(str(p) for p in found)}" if found else ""))
    return found[0]


def local_folder(uri: str) -> Path:
    """A folder or `s3://` prefix as a folder on this machine (an `s3://` one downloaded into the cache)."""
    return download_prefix(uri) if is_s3_uri(uri) else Path(uri)


def load_model_folder(uri: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> JanusBundle:
    """A checkpoint folder or `s3://` prefix: the model in it, or for a LoRA adapter its base with
    the adapter attached (unmerged: exactly what the server computes with it)."""
    folder = local_folder(uri)
    if is_adapter_folder(folder):
        return load_adapter_bundle(folder, device=device, dtype=dtype)
    return load_pretrained(folder, dtype=dtype, device=device)


def load_generation_model(uri: str, device: str | torch.device = "cpu",
                          dtype: torch.dtype | None = None) -> JanusBundle:
    """Loads the model a generation run names: a checkpoint, a registry URI, `debug` or `mini`.

    Args:
        uri: checkpoint or LoRA adapter folder, `s3://` prefix, `models:/name@alias`, `debug` or `mini`.
        device: where the weights go.
        dtype: parameter dtype (None: as saved; float32 for the built-in models).
    """
    if uri in BUILT_IN_MODELS:
        return build_built_in(uri, device, dtype)
    return load_model_folder(resolve_model_uri(uri), device=device, dtype=dtype)


@dataclass(frozen=True)
class RegisteredVersion:
    """The registry version a `models:/` URI points at right now."""

    name: str
    version: str
    run_id: str | None
    alias: str | None = None
    """The alias the URI named (`champion`), or None for `models:/name/version`."""

    @property
    def uri(self) -> str:
        """The version's own URI, stable when the alias moves on."""
        return f"{REGISTRY_SCHEME}{self.name}/{self.version}"


def registered_version(uri: str, client=None) -> RegisteredVersion | None:
    """Resolves `models:/name@alias` or `models:/name/version` to its version and run.

    Returns:
        None for URIs outside the registry (folders, `s3://` prefixes, `debug`).

    Raises:
        ModelSourceError: a malformed registry URI, or a name, alias or version the registry
            does not have.
    """
    if not uri.startswith(REGISTRY_SCHEME):
        return None
    rest = uri[len(REGISTRY_SCHEME):].strip("/")
    name, alias, version = rest, None, None
    if "@" in rest:
        name, alias = rest.split("@", 1)
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
    if not name or (alias is None and version is None) or alias == "" or version == "":
        raise ModelSourceError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient()
    from janus_lab.tracking import check_tracking_server

    check_tracking_server(client.tracking_uri, error=lambda message: ModelSourceError(f"{uri}: {message}"))
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except Exception as err:  # noqa: BLE001 - MLflow raises RestException and friends
        raise ModelSourceError(f"{uri} is not in the MLflow registry: {err}") from err
    return RegisteredVersion(name=name, version=str(found.version), run_id=found.run_id, alias=alias)
