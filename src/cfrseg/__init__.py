"""cfrseg: Concatenate, Fine-tune, Re-train.

The core package holds the algorithm as plain typed functions, one ``run_<stage>(config, data, store)`` per
stage. It never imports grpc, celery, redis or minio; the service layer in ``services/`` wraps it.
"""

__version__ = "0.1.0"
