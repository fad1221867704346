"""The retrain stage service: ``python -m services.retrain --port N`` (core: cfrseg.stages.retrain.run_retrain), which
also segments volumes with a trained model (Segment)."""
