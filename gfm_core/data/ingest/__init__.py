"""GeoPile ingestion: sources, the manifest and its quarantine, statistics, validation verdicts and shards."""
