"""The gateway: cfrseg's public gRPC API (uploads, datasets, runs, models, segmentation, artifacts)."""
