"""Model archives as torch-model-archiver writes them (PROTOCOLS.md 5.7): find, unpack, read the manifest.

A model is registered from a `url` relative to the model store: a `.mar` (a ZIP, deflated or stored), a
`.tar.gz`/`.tgz`, or a folder holding `MAR-INF/MANIFEST.json` (`--archive-format no-archive`). ZIP and
tar archives are unpacked into a temporary folder of their own, removed when the model version is
unregistered; a folder is used in place. The manifest names the handler, the serialized file, the
version and, optionally, a model-config YAML whose frontend keys (batchSize, maxBatchDelay, minWorkers,
maxWorkers, responseTimeout, ...) set the model's defaults and whose whole content reaches the handler
as `context.model_yaml_config`.

Refusals carry TorchServe's exceptions and messages (its ModelArchive and ArchiveUtils): a url that is
not in the store is 404 ModelNotFoundException "Model not found at: URL", `..` in a url is refused, an
archive without a usable manifest is 400 InvalidModelException. Downloading from http(s) URLs is not
done by this server (no network in the places it runs): such a url is 400 DownloadArchiveException.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servers.torchserve._wire import TsError

__all__ = ["Archive", "open_archive"]

_MANIFEST = "MAR-INF/MANIFEST.json"
_RUNTIMES = ("python", "python3", "LSP")


@dataclass
class Archive:
    """One unpacked model archive."""

    url: str
    model_dir: Path
    manifest: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    """The model-config YAML named by the manifest's configFile ({} without one)."""
    owns_dir: bool = False

    @property
    def name(self) -> str:
        return self.manifest["model"]["modelName"]

    @property
    def version(self) -> str:
        return str(self.manifest["model"]["modelVersion"])

    @property
    def handler(self) -> str:
        return self.manifest["model"].get("handler", "")

    @property
    def runtime(self) -> str:
        return self.manifest.get("runtime", "python")

    def close(self) -> None:
        """Remove the unpacked files (never a folder the user gave)."""
        if self.owns_dir:
            shutil.rmtree(self.model_dir, ignore_errors=True)


def open_archive(store: Path | None, url: str, model_name: str | None = None) -> Archive:
    """Find `url` in the model store, unpack it and check its manifest; raises TsError.

    `model_name` (the register request's or the `name=` of --models) replaces the manifest's name.
    """
    if store is None:
        raise TsError(404, "ModelNotFoundException", "Model store has not been configured.")
    if not url:
        raise TsError(404, "ModelNotFoundException", "empty url")
    if url.startswith(("http://", "https://", "s3://")):
        raise TsError(400, "DownloadArchiveException",
                      f"Failed to download archive from: {url} (only the model store is read here)")
    local = url.removeprefix("file://")
    if ".." in Path(local).parts:
        raise TsError(404, "ModelNotFoundException", f"Relative path is not allowed in url: {url}")
    path = Path(local) if Path(local).is_absolute() else store / local
    if not path.exists():
        raise TsError(404, "ModelNotFoundException", f"Model not found at: {url}")
    if path.is_dir():
        archive = Archive(url, path, {})
    else:
        archive = Archive(url, _unpack(path, url), {}, owns_dir=True)
    try:
        archive.manifest = _read_manifest(archive.model_dir)
        if model_name:
            archive.manifest["model"]["modelName"] = model_name
        _validate(archive.manifest)
        archive.config = _read_config(archive.model_dir, archive.manifest)
    except BaseException:
        archive.close()
        raise
    return archive


def _unpack(path: Path, url: str) -> Path:
    target = Path(tempfile.mkdtemp(prefix=f"ts-{path.stem}-"))
    try:
        if path.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(path, "r:gz") as tar:
                tar.extractall(target, filter="data")
            _flatten_tgz(target)
        else:
            with zipfile.ZipFile(path) as archive:
                for member in archive.infolist():
                    _check_member(target, member.filename)
                archive.extractall(target)
    except zipfile.BadZipFile:
        pass  # as TorchServe: no entries read, hence no manifest (400 below)
    except (OSError, tarfile.TarError, EOFError) as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise TsError(500, "InternalServerException", f"Failed to save model: {url}") from exc
    return target


def _check_member(target: Path, name: str) -> None:
    resolved = (target / name).resolve()
    if not resolved.is_relative_to(target.resolve()):
        raise OSError(f"Detected Zip Slip vulnerability: {name}")


def _flatten_tgz(target: Path) -> None:
    """A .tar.gz made by torch-model-archiver holds one folder, <model>/MAR-INF/...: use that folder."""
    if (target / "MAR-INF").exists():
        return
    entries = list(target.iterdir())
    if len(entries) == 1 and (entries[0] / "MAR-INF").exists():
        for item in entries[0].iterdir():
            item.rename(target / item.name)
        entries[0].rmdir()


def _read_manifest(model_dir: Path) -> dict[str, Any]:
    path = model_dir / _MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise TsError(400, "InvalidModelException", "Failed to parse signature.json.") from exc
    return manifest if isinstance(manifest, dict) else {}


def _validate(manifest: dict[str, Any]) -> None:
    model = manifest.get("model")
    if not isinstance(model, dict):
        raise TsError(400, "InvalidModelException", "Missing Model entry in manifest file.")
    if not model.get("modelName"):
        raise TsError(400, "InvalidModelException", "Model name is not defined.")
    if not model.get("modelVersion"):
        raise TsError(400, "InvalidModelException", "Model version is not defined.")
    if manifest.get("runtime", "python") not in _RUNTIMES:
        raise TsError(400, "InvalidModelException", "Runtime is not defined or invalid.")
    if not model.get("handler"):
        raise TsError(400, "InvalidModelException", "Model handler is not defined.")


def _read_config(model_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    name = manifest["model"].get("configFile")
    if not name:
        return {}
    try:
        import yaml

        config = yaml.safe_load((model_dir / name).read_text())
    except Exception as exc:
        raise TsError(400, "InvalidModelException", "Failed to parse model config yaml file.") from exc
    return config if isinstance(config, dict) else {}
