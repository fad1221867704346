"""The pseudolabel stage service: ``python -m services.pseudolabel --port N``
(core: cfrseg.pseudolabel.run_pseudolabel)."""
