"""The pseudolabel stage service: ``python -m services.pseudolabel --port N``
(core: cfrseg.stages.pseudolabel.run_pseudolabel)."""
