"""Run orchestration: a Celery app whose worker drives each run through the stage services in short,
idempotent steps (see :mod:`services.orchestrator.engine`)."""
