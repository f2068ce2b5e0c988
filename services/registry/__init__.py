"""Registry service: models, their immutable versions, aliases, datasets and artifact blobs."""
