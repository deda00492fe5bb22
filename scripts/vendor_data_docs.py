#!/usr/bin/env python3
"""Vendor Great Expectations' Data Docs web assets from the npm registry (install time only; make env runs it).

Downloads the pinned npm tarballs of gfm_core.data.ingest.docs_vendor.ASSETS, checks each against its pinned
sha512 integrity and extracts the CSS, JS and web fonts into <package cache>/npm (``$GFM_PACKAGE_CACHE`` or
.cache/packages). Idempotent: vendored packages are skipped without touching the network. ``gfm validate``
then serves them from the Data Docs folder, so the pages work offline.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gfm_core.data.ingest.docs_vendor import main

if __name__ == "__main__":
    main()
