"""The web assets of Great Expectations' Data Docs, vendored from the npm registry at install time.

GE 1.x writes Data Docs pages that load Bootstrap, bootstrap-table, jQuery, Vega and Font Awesome from CDNs,
so offline the index lists no validation (its table is drawn by bootstrap-table) and every page is unstyled.
:data:`ASSETS` pins the exact npm tarballs (version and the registry's ``dist.integrity``, so a changed
tarball fails) and the files the pages need; :func:`vendor_assets` downloads and extracts them into
``<package cache>/npm/<name>@<version>/`` (``make env`` runs it through ``scripts/vendor_data_docs.py``; it
is the only step that uses the network). :data:`CDN_FILES` maps each CDN URL GE writes to its vendored file;
:mod:`~gfm_core.data.ingest.data_docs` copies them into a built site and rewrites the pages.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from gfm_core.demo.packages import package_cache
from gfm_core.errors import GfmError
from gfm_core.io import atomic_write

REGISTRY = "https://registry.npmjs.org"
COMPLETE = ".complete"


@dataclass(frozen=True)
class NpmAsset:
    """One pinned npm tarball and the files taken from it.

    Attributes:
        name: npm package name (scoped names keep their ``@scope/``).
        version: exact version.
        integrity: the registry's ``dist.integrity`` (``sha512-<base64>``).
        files: paths inside the package (without the tarball's top folder); a trailing ``/`` takes a folder.
    """

    name: str
    version: str
    integrity: str
    files: tuple[str, ...]

    @property
    def folder(self) -> str:
        """The asset's folder under the vendor root: ``<name>@<version>``."""
        return f"{self.name}@{self.version}"

    def tarball_url(self, registry: str = REGISTRY) -> str:
        """The tarball's URL (``<registry>/<name>/-/<basename>-<version>.tgz``)."""
        return f"{registry.rstrip('/')}/{self.name}/-/{self.name.split('/')[-1]}-{self.version}.tgz"


ASSETS: tuple[NpmAsset, ...] = (
    NpmAsset("bootstrap", "4.3.1",
             "sha512-rXqOmH1VilAt2DyPzluTi2blhk17bO7ef+zLLPlWvG494pDxcM234pJ8wTc/6R40UWizAIIMgxjvxZg5kmsbag==",
             ("dist/css/bootstrap.min.css", "dist/js/bootstrap.min.js")),
    NpmAsset("@forevolve/bootstrap-dark", "1.1.0",
             "sha512-A3ucpEpxPoTVO490lZZCfjPXxv832l7mm1IxX3bXyxvgwnPGXDLyh7dWrphXKO8YBAu3EswbBEu3VSW8NRMW3A==",
             ("dist/css/bootstrap-prefers-dark.css",)),
    NpmAsset("bootstrap-datepicker", "1.9.0",
             "sha512-9rYYbaVOheGYxjOr/+bJCmRPihfy+LkLSg4fIFMT9Od8WwWB/MB50w0JO1eBgKUMbb7PFHQD5uAfI3ArAxZRXA==",
             ("dist/css/bootstrap-datepicker.min.css", "dist/js/bootstrap-datepicker.min.js")),
    NpmAsset("@fortawesome/fontawesome-free", "6.6.0",
             "sha512-60G28ke/sXdtS9KZCpZSHHkCbdsOGEhIUGlwq6yhY74UpTiToIh8np7A8yphhM4BWsvNFtIvLpi4co+h9Mr9Ow==",
             ("css/all.min.css", "webfonts/")),
    NpmAsset("bootstrap-table", "1.19.1",
             "sha512-WvV+l1AI/C+zThaKmfHmi/IuayVNB0qdFyEhFx1jyZhO0oLtNJNANkCR3rvJf6Dkh72dsLElxpE/bzK9seEQLA==",
             ("dist/bootstrap-table.min.css", "dist/bootstrap-table.min.js",
              "dist/extensions/filter-control/bootstrap-table-filter-control.min.js")),
    NpmAsset("bootstrap-table", "1.19.0",
             "sha512-L+USHm3X9FKocx/6yngGu12yF6r6s1Ntuc+hoIK2a2QQJjHw5kcySLiE2HY/9sEaSGAOfPbfQOtBH3uKkcpqEA==",
             ("dist/extensions/filter-control/bootstrap-table-filter-control.min.css",
              "dist/extensions/filter-control/bootstrap-table-filter-control.css")),
    NpmAsset("popper.js", "1.12.9",
             "sha512-s0EEi9xiSCdqz9lV4IiVH5yIZnDX/U1t0tCjB+0jXx9jW8lrR7kOpVupiUg175ogqVoudpDXHF1p6dKATCHMeg==",
             ("dist/umd/popper.min.js",)),
    NpmAsset("jquery", "3.7.1",
             "sha512-m4avr8yL8kmFN8psrbFFFmB/If14iN5o9nw/NgnnM+kybDJpRsAynV2BsfpTYrTRysYUdADVD7CkUUizgkpLfg==",
             ("dist/jquery.min.js",)),
    # GE asks for the latest of majors 5 / 5 / 6 (jsDelivr's default file); pinned to the newest at vendoring.
    NpmAsset("vega", "5.33.1",
             "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw==",
             ("build/vega.min.js",)),
    NpmAsset("vega-lite", "5.23.0",
             "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA==",
             ("build/vega-lite.min.js",)),
    NpmAsset("vega-embed", "6.29.0",
             "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q==",
             ("build/vega-embed.min.js",)),
)

_BT = "https://unpkg.com/bootstrap-table@"
_FC = "dist/extensions/filter-control/bootstrap-table-filter-control"
#: CDN URL in GE 1.x's pages -> vendored file, relative to the vendor root.
CDN_FILES: dict[str, str] = {
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css":
        "bootstrap@4.3.1/dist/css/bootstrap.min.css",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js":
        "bootstrap@4.3.1/dist/js/bootstrap.min.js",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css":
        "@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
        "bootstrap-datepicker@1.9.0/dist/css/bootstrap-datepicker.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
        "bootstrap-datepicker@1.9.0/dist/js/bootstrap-datepicker.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css":
        "@fortawesome/fontawesome-free@6.6.0/css/all.min.css",
    f"{_BT}1.19.1/dist/bootstrap-table.min.css": "bootstrap-table@1.19.1/dist/bootstrap-table.min.css",
    f"{_BT}1.19.1/dist/bootstrap-table.min.js": "bootstrap-table@1.19.1/dist/bootstrap-table.min.js",
    f"{_BT}1.19.1/{_FC}.min.js": f"bootstrap-table@1.19.1/{_FC}.min.js",
    f"{_BT}1.19.0/{_FC}.min.css": f"bootstrap-table@1.19.0/{_FC}.min.css",
    f"{_BT}1.19.0/{_FC}.css": f"bootstrap-table@1.19.0/{_FC}.css",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js":
        "popper.js@1.12.9/dist/umd/popper.min.js",
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery@3.7.1/dist/jquery.min.js",
    "https://cdn.jsdelivr.net/npm/vega@5": "vega@5.33.1/build/vega.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@5": "vega-lite@5.23.0/build/vega-lite.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6": "vega-embed@6.29.0/build/vega-embed.min.js",
}


def vendor_root() -> Path:
    """Where the assets are vendored: ``<package cache>/npm`` (``$GFM_PACKAGE_CACHE`` or ``.cache/packages``)."""
    return package_cache() / "npm"


def vendored(root: Path | None = None) -> bool:
    """Whether every asset of :data:`ASSETS` is fully extracted under ``root``."""
    root = root or vendor_root()
    return all((root / a.folder / COMPLETE).is_file() for a in ASSETS)


def integrity_of(data: bytes) -> str:
    """The npm ``dist.integrity`` string of a tarball's bytes (``sha512-<base64>``)."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def _wanted(asset: NpmAsset, member: str) -> str | None:
    """The package-relative path of a tarball member when ``asset`` takes it, else None."""
    parts = PurePosixPath(member).parts[1:]  # drop the top folder (``package/`` in most tarballs)
    if not parts or ".." in parts:
        return None
    rel = "/".join(parts)
    for f in asset.files:
        if rel == f or (f.endswith("/") and rel.startswith(f)):
            return rel
    return None


def fetch_asset(asset: NpmAsset, root: Path, registry: str = REGISTRY) -> Path:
    """Download one tarball, check its integrity and extract the wanted files (idempotent).

    Raises:
        GfmError: the tarball's sha512 is not the pinned integrity, or a wanted file is missing from it.
    """
    folder = root / asset.folder
    if (folder / COMPLETE).is_file():
        return folder
    url = asset.tarball_url(registry)
    with urllib.request.urlopen(url, timeout=300) as resp:
        data = resp.read()
    got = integrity_of(data)
    if got != asset.integrity:
        raise GfmError(f"{url}: integrity {got} is not the pinned {asset.integrity} ({asset.folder}); "
                       f"refusing to vendor it")
    folder.mkdir(parents=True, exist_ok=True)
    found: set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            rel = _wanted(asset, member.name) if member.isfile() else None
            src = tar.extractfile(member) if rel else None
            if rel is None or src is None:
                continue
            with atomic_write(folder / rel) as out:
                shutil.copyfileobj(src, out)
            found.add(rel)
    missing = [f for f in asset.files
               if not (any(r.startswith(f) for r in found) if f.endswith("/") else f in found)]
    if missing:
        raise GfmError(f"{url} lacks {', '.join(missing)} ({asset.folder})")
    (folder / COMPLETE).write_text(asset.integrity + "\n")
    return folder


def vendor_assets(root: Path | None = None, registry: str | None = None) -> list[str]:
    """Vendor every asset of :data:`ASSETS` into ``root`` (default :func:`vendor_root`).

    The registry is ``$GFM_NPM_REGISTRY`` when set (a mirror), else the public npm registry. Returns the
    folders fetched now (empty when all were already there: no network used).
    """
    root = root or vendor_root()
    registry = registry or os.environ.get("GFM_NPM_REGISTRY") or REGISTRY
    fetched = [a.folder for a in ASSETS if not (root / a.folder / COMPLETE).is_file()]
    for asset in ASSETS:
        fetch_asset(asset, root, registry)
    return fetched


def main() -> None:
    """Vendor the assets, saying what was fetched (``scripts/vendor_data_docs.py``; ``make env`` runs it)."""
    try:
        fetched = vendor_assets()
    except (OSError, GfmError) as e:  # offline, registry down, or a tarball that is not the pinned one
        raise SystemExit(f"[data docs] vendoring failed: {e}") from e
    if fetched:
        print(f"[data docs] vendored {', '.join(fetched)} into {vendor_root()}")


if __name__ == "__main__":
    main()
