"""Data Docs work offline: vendored npm assets (sha512-pinned) copied in, every CDN URL rewritten to a local path.

No test downloads: the rewrite is tested on a fake vendor tree, the real vendored files (``make env``) and the
headless-Chromium check are skipped, with the reason, where absent.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from helpers.rasters import make_photo

from gfm_core.data.ingest import docs_vendor
from gfm_core.data.ingest.data_docs import VENDOR_DIR, asset_urls, is_external, localize
from gfm_core.data.ingest.docs_vendor import ASSETS, CDN_FILES, COMPLETE, NpmAsset, fetch_asset, integrity_of
from gfm_core.data.ingest.manifest import build_manifest
from gfm_core.data.ingest.sources import IngestSettings, folder_source
from gfm_core.data.ingest.validation import DOCS_DIR, validate_manifest
from gfm_core.errors import GfmError

SOURCES = [folder_source("photos", "photos")]
REAL_VENDOR = docs_vendor.vendor_root()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("ddpile")
    for i in range(3):
        make_photo(base / "data" / "photos" / f"p{i}.png", size=40, seed=i)
    report = build_manifest(base / "data", SOURCES, base / "ingest", settings=IngestSettings(min_size=16, workers=0),
                            progress=False)
    return report.manifest_path


def fake_vendor(root: Path) -> Path:
    """A vendor tree with every asset's files as one-line stand-ins (and Font Awesome's webfonts folder)."""
    for rel in CDN_FILES.values():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"/* {rel} */\n")
    fonts = root / "@fortawesome/fontawesome-free@6.6.0/webfonts"
    fonts.mkdir(parents=True, exist_ok=True)
    (fonts / "fa-solid-900.woff2").write_bytes(b"font")
    for asset in ASSETS:
        (root / asset.folder / COMPLETE).write_text("fake\n")
    return root


def build_site(manifest: Path, out: Path, cache: Path, monkeypatch) -> Path:
    """``validate_manifest`` with the package cache at ``cache``; the Data Docs folder."""
    monkeypatch.setenv("GFM_PACKAGE_CACHE", str(cache))
    rep = validate_manifest(manifest, SOURCES, out_dir=out, min_size=32, max_nodata_fraction=0.2,
                            max_bad_fraction=0.25)
    assert rep.success, rep.summary()
    return out / DOCS_DIR


def site_files(site: Path) -> list[Path]:
    return [p for p in site.rglob("*") if p.suffix in (".html", ".css") and (site / VENDOR_DIR) not in p.parents]


def check_offline(site: Path) -> int:
    """Assert no page or stylesheet loads anything from outside the site and every local asset exists."""
    checked = 0
    for path in site_files(site):
        for url in asset_urls(path):
            assert not is_external(url), f"{path.relative_to(site)} loads {url}"
            target = (path.parent / urlsplit(url).path).resolve()
            assert target.is_file(), f"{path.relative_to(site)}: {url} -> missing {target}"
            assert site.resolve() in target.parents, f"{url} leaves the site"
            checked += 1
    return checked


def test_site_with_vendored_assets_loads_nothing_from_outside(manifest, tmp_path, monkeypatch, caplog):
    vendor = fake_vendor(tmp_path / "cache" / "npm")
    with caplog.at_level(logging.WARNING, logger="gfm_core.data.ingest.data_docs"):
        site = build_site(manifest, tmp_path / "val", tmp_path / "cache", monkeypatch)
    assert not caplog.records
    assert check_offline(site) > 5 * 14  # 5 pages x (the CDN assets + the logo + GE's local css/favicon)
    assert (site / VENDOR_DIR / "jquery@3.7.1/dist/jquery.min.js").read_text() == (
        vendor / "jquery@3.7.1/dist/jquery.min.js").read_text()
    assert not list(site.rglob(COMPLETE))
    # a page three folders deep reaches the vendor folder with ../../../../
    deep = next((site / "validations").rglob("*.html"))
    assert len(deep.relative_to(site).parts) == 5
    assert 'src="../../../../static/vendor/jquery@3.7.1/dist/jquery.min.js"' in deep.read_text()
    # the index's validation table: bootstrap-table draws it from rows embedded in the page, one per run
    index = (site / "index.html").read_text()
    links = re.findall(r"'_table_row_link_path': '(validations/[^']+)'", index)
    assert sorted(Path(link).parts[1] for link in links) == ["geopile_manifest", "geopile_pile"]
    assert all((site / link).is_file() for link in links)
    assert "https://greatexpectations.io" in index  # plain links stay


def test_missing_vendor_keeps_cdn_links_and_warns_once(manifest, tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="gfm_core.data.ingest.data_docs"):
        site = build_site(manifest, tmp_path / "val", tmp_path / "empty", monkeypatch)
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "make env" in msg and "scripts/vendor_data_docs.py" in msg and str(tmp_path / "empty") in msg
    assert "https://code.jquery.com/jquery-3.7.1.min.js" in msg
    assert "amazonaws" not in msg  # GE's logo is served from the copy GE puts in the site
    assert "https://code.jquery.com/jquery-3.7.1.min.js" in (site / "index.html").read_text()
    assert not (site / VENDOR_DIR).exists()


def test_rewrite_is_relative_per_depth_and_reports_unknown_assets(tmp_path, caplog):
    site = tmp_path / "site"
    cdn = "https://cdn.jsdelivr.net/npm/vega@5"
    page = (f'<html><head><script src="{cdn}"></script><script src="https://example.org/new.js"></script>'
            f'<style>.x {{ background: url(https://example.org/bg.png) }}</style></head><body>'
            f'<a href="https://greatexpectations.io">GE</a><div style="background: url(\'{cdn}\')"></div>'
            f'</body></html>')
    for rel in ("index.html", "a/b/page.html"):
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(page)
    with caplog.at_level(logging.WARNING, logger="gfm_core.data.ingest.data_docs"):
        rep = localize(site, vendor=fake_vendor(tmp_path / "npm"))
    assert rep.vendored and rep.rewritten == 4
    assert rep.external == ("https://example.org/bg.png", "https://example.org/new.js")
    assert 'src="static/vendor/vega@5.33.1/build/vega.min.js"' in (site / "index.html").read_text()
    deep = (site / "a/b/page.html").read_text()
    assert 'src="../../static/vendor/vega@5.33.1/build/vega.min.js"' in deep
    assert "url('../../static/vendor/vega@5.33.1/build/vega.min.js')" in deep
    assert '<a href="https://greatexpectations.io">' in deep
    assert len(caplog.records) == 1 and "https://example.org/new.js" in caplog.records[0].getMessage()
    assert "greatexpectations.io" not in caplog.records[0].getMessage()


# -------------------------------------------------------------------------------- vendoring (no network)


def _tarball(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_fetch_asset_checks_integrity_and_extracts_only_the_wanted_files(tmp_path):
    data = _tarball({"package/dist/a.css": b"a{}", "package/dist/b.js": b"b", "package/fonts/f.woff2": b"f",
                     "package/fonts/g.ttf": b"g", "package/../evil.js": b"x", "package/README.md": b"r"})
    registry = tmp_path / "registry"
    (registry / "@x/kit/-").mkdir(parents=True)
    (registry / "@x/kit/-/kit-1.0.0.tgz").write_bytes(data)
    asset = NpmAsset("@x/kit", "1.0.0", integrity_of(data), ("dist/a.css", "fonts/"))
    folder = fetch_asset(asset, tmp_path / "npm", registry=registry.as_uri())
    got = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert got == [COMPLETE, "dist/a.css", "fonts/f.woff2", "fonts/g.ttf"]
    assert not (tmp_path / "evil.js").exists()

    tampered = NpmAsset("@x/kit", "1.0.0", integrity_of(data + b"!"), asset.files)
    with pytest.raises(GfmError, match=r"integrity sha512-.* is not the pinned"):
        fetch_asset(tampered, tmp_path / "npm2", registry=registry.as_uri())
    assert not (tmp_path / "npm2" / tampered.folder / COMPLETE).exists()

    lacking = NpmAsset("@x/kit", "1.0.0", integrity_of(data), ("dist/missing.js",))
    with pytest.raises(GfmError, match=r"lacks dist/missing\.js"):
        fetch_asset(lacking, tmp_path / "npm3", registry=registry.as_uri())


def test_every_cdn_url_maps_into_a_pinned_asset():
    folders = {a.folder: a for a in ASSETS}
    for url, rel in CDN_FILES.items():
        folder = next(f for f in folders if rel.startswith(f + "/"))
        assert rel[len(folder) + 1:] in folders[folder].files, url
    assert all(re.fullmatch(r"sha512-[A-Za-z0-9+/]{86}==", a.integrity) for a in ASSETS)


# ---------------------------------------------------------- the real vendored files (make env fetches them)

needs_vendor = pytest.mark.skipif(
    not docs_vendor.vendored(REAL_VENDOR),
    reason=f"Data Docs assets not vendored in {REAL_VENDOR} (make env, or python scripts/vendor_data_docs.py)",
)


@needs_vendor
def test_real_vendored_assets_make_a_self_contained_site(manifest, tmp_path, monkeypatch):
    site = build_site(manifest, tmp_path / "val", REAL_VENDOR.parent, monkeypatch)
    check_offline(site)
    fa = site / VENDOR_DIR / "@fortawesome/fontawesome-free@6.6.0/css/all.min.css"
    fonts = asset_urls(fa)
    assert {Path(u).suffix for u in fonts} == {".woff2", ".ttf"}
    assert all((fa.parent / u).is_file() for u in fonts)
    assert "jQuery v3.7.1" in (site / VENDOR_DIR / "jquery@3.7.1/dist/jquery.min.js").read_text()[:200]
    assert "Bootstrap v4.3.1" in (site / VENDOR_DIR / CDN_FILES[
        "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css"]).read_text()[:200]


_PROBE = """<script>
window.addEventListener("load", function () {
  document.fonts.ready.then(function () {
    var d = document.documentElement;
    d.setAttribute("data-probe-font", getComputedStyle(document.body).fontFamily);
    d.setAttribute("data-probe-rows", document.querySelectorAll("table tbody tr[data-index]").length);
    d.setAttribute("data-probe-fa", Array.from(document.fonts).filter(function (f) {
      return f.family.indexOf("Font Awesome") >= 0 && f.status === "loaded"; }).length);
    d.setAttribute("data-probe-vega", typeof window.vegaEmbed);
  });
});
</script>"""


def render_offline(page: Path, chromium: str) -> dict[str, str]:
    """Load a page over file:// in headless Chromium with DNS and proxy blocked; the probe's readings."""
    probe = page.with_name("probe-" + page.name)  # beside the page, so its relative URLs resolve the same
    probe.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    out = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", "--virtual-time-budget=5000",
         "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    html = re.search(r"<html[^>]*>", out)
    assert html, out[:500]
    return dict(re.findall(r'data-probe-(\w+)="([^"]*)"', html.group(0)))


@needs_vendor
@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="no headless Chromium (Debian's: apt-get install chromium; make screenshots does)")
def test_index_renders_offline_in_headless_chromium(manifest, tmp_path, monkeypatch):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    site = build_site(manifest, tmp_path / "val", REAL_VENDOR.parent, monkeypatch)
    got = render_offline(site / "index.html", chromium)
    assert int(got["rows"]) == 4  # 2 validation results + 2 expectation suites, drawn by bootstrap-table
    assert "Segoe UI" in got["font"]  # Bootstrap's font stack (the browser default is Times New Roman)
    assert int(got["fa"]) >= 1 and got["vega"] == "function"
    page = render_offline(next((site / "validations").rglob("*.html")), chromium)
    assert "Segoe UI" in page["font"] and page["vega"] == "function"
