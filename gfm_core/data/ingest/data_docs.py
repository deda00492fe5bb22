"""Make a built Great Expectations Data Docs site work offline: local copies of its CDN assets.

:func:`localize` copies the vendored assets (:mod:`~gfm_core.data.ingest.docs_vendor`) into
``<site>/static/vendor/`` and rewrites every CDN URL of every ``.html`` and ``.css`` file of the site to a path
relative to that file (pages live at different depths). GE's logo, which the pages load from S3, points at the
``static/images/logo-long.png`` GE ships in the site. Any asset URL still external afterwards (vendor cache
missing, or a GE release that loads something new) is named in one warning; plain links (``<a href>``) are
not assets and stay as they are.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from gfm_core.data.ingest.docs_vendor import ASSETS, CDN_FILES, COMPLETE, vendor_root, vendored

log = logging.getLogger(__name__)

VENDOR_DIR = "static/vendor"
GE_LOGO = "static/images/logo-long.png"
_GE_LOGO_URL = re.compile(r"https://great-expectations-web-assets\.s3[.\w-]*\.amazonaws\.com/[\w-]+\.png(\?.*)?$")
_CSS_URL = re.compile(r"""url\(\s*(['"]?)([^'")\s]+)\1\s*\)|@import\s+(['"])([^'"]+)\3""")
_ASSET_ATTRS = {"script": "src", "img": "src", "iframe": "src", "source": "src", "embed": "src",
                "audio": "src", "video": "src", "link": "href"}
VENDOR_HINT = "vendor them once with `make env` (or: python scripts/vendor_data_docs.py), then re-run gfm validate"


@dataclass(frozen=True)
class LocalizeReport:
    """What :func:`localize` did to a site.

    Attributes:
        rewritten: asset URLs rewritten to local paths, over all files.
        external: asset URLs still loaded from outside the site, sorted (empty when it works offline).
        vendored: whether the vendored assets were found and copied in.
    """

    rewritten: int
    external: tuple[str, ...]
    vendored: bool


class _AssetRefs(HTMLParser):
    """Collects the URLs a page loads: script/img/... ``src``, ``<link href>``, ``url()`` in styles."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.urls: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        want = _ASSET_ATTRS.get(tag)
        for name, value in attrs:
            if value and name == want:
                self.urls.append(value.strip())
            elif value and name == "style":
                self.urls += css_urls(value)
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.urls += css_urls(data)


def css_urls(css: str) -> list[str]:
    """The URLs a stylesheet loads (``url(...)`` and ``@import``), ``data:`` URIs left out."""
    found = [m.group(2) or m.group(4) for m in _CSS_URL.finditer(css)]
    return [u for u in found if not u.startswith("data:")]


def asset_urls(path: Path) -> list[str]:
    """The URLs an ``.html`` or ``.css`` file of the site loads."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".css":
        return css_urls(text)
    parser = _AssetRefs()
    parser.feed(text)
    parser.close()
    return parser.urls


def is_external(url: str) -> bool:
    """Whether a URL leaves the site (an absolute ``http(s):`` or protocol-relative URL)."""
    return bool(re.match(r"(?i)(https?:)?//", url))


def _local_target(url: str, site: Path, have_vendor: bool) -> Path | None:
    """The local file that replaces an external asset URL, or None when there is none."""
    if have_vendor and url in CDN_FILES:
        return site / VENDOR_DIR / CDN_FILES[url]
    if _GE_LOGO_URL.match(url) and (site / GE_LOGO).is_file():
        return site / GE_LOGO
    return None


def _misdirected(url: str, page: Path, site: Path) -> Path | None:
    """The site's ``static/...`` file a relative URL that resolves to nothing means, else None.

    GE writes the favicon of validation pages one ``../`` short; the file is at the site's ``static/``.
    """
    path = url.split("?")[0].split("#")[0]
    if (page.parent / path).is_file() or "static/" not in path:
        return None
    target = site / path[path.index("static/"):]
    return target if target.is_file() else None


def _rewrite_file(path: Path, site: Path, have_vendor: bool) -> tuple[int, set[str]]:
    """Rewrite one file's external asset URLs in place; the count rewritten and the URLs left external."""
    text = path.read_text(encoding="utf-8")
    left: set[str] = set()
    count = 0
    for url in sorted(set(asset_urls(path))):
        external = is_external(url)
        target = _local_target(url, site, have_vendor) if external else _misdirected(url, path, site)
        if target is None:
            if external:
                left.add(url)
            continue
        rel = Path(os.path.relpath(target, path.parent)).as_posix()
        text, n = re.subn(r"(?<=[\"'(])" + re.escape(url) + r"(?=[\"')])", rel, text)
        count += n
    if count:
        path.write_text(text, encoding="utf-8")
    return count, left


def copy_vendor(site: Path, root: Path) -> None:
    """Copy the vendored assets (without their stamps) into ``<site>/static/vendor``."""
    dest = site / VENDOR_DIR
    for asset in ASSETS:
        shutil.copytree(root / asset.folder, dest / asset.folder, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(COMPLETE))


def localize(site: Path, vendor: Path | None = None) -> LocalizeReport:
    """Point a built Data Docs site at local copies of its web assets, in place.

    Args:
        site: the site's root folder (where ``index.html`` is).
        vendor: the vendored assets' root; default :func:`~gfm_core.data.ingest.docs_vendor.vendor_root`.

    Returns:
        what was rewritten and what stays external. When anything stays external, one warning names it
        and how to vendor the assets; the site then still works online.
    """
    root = vendor or vendor_root()
    have_vendor = vendored(root)
    if have_vendor:
        copy_vendor(site, root)
    rewritten = 0
    external: set[str] = set()
    for path in sorted(p for p in site.rglob("*") if p.suffix in (".html", ".css") and p.is_file()):
        if (site / VENDOR_DIR) in path.parents:
            continue
        n, left = _rewrite_file(path, site, have_vendor)
        rewritten += n
        external |= left
    if external:
        why = (f"the vendored web assets are missing from {root}: {VENDOR_HINT}" if not have_vendor else
               "not among the vendored assets of gfm_core/data/ingest/docs_vendor.py; a newer great-expectations?")
        log.warning("Data Docs in %s load %d asset(s) from the internet, so offline they are unstyled (%s): %s",
                    site, len(external), why, ", ".join(sorted(external)))
    return LocalizeReport(rewritten, tuple(sorted(external)), have_vendor)
