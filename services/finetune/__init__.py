"""The finetune stage service: ``python -m services.finetune --port N`` (core: cfrseg.finetune.run_finetune)."""
