"""The finetune stage service: ``python -m services.finetune --port N`` (core: cfrseg.stages.finetune.run_finetune)."""
