"""cfrseg's gRPC service stack: stage services (finetune, pseudolabel, retrain), the gateway, the Celery worker.

``services.gen`` holds the generated stubs (scripts/gen_protos.py); ``services.common`` the shared server parts.
"""
