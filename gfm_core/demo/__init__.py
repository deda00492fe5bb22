"""The embedded demo data: a tiny GeoPile and five downstream tasks built from imagery in registry packages."""
