"""The CFR stages, one module each, one ``run_<stage>(config, data, store, ...)`` shape.

- ``finetune``: fine-tune SAM on mosaics of the labeled volumes (``run_finetune``).
- ``pseudolabel``: label every unlabeled volume with the fine-tuned SAM (``run_pseudolabel``, ``evaluate_sam``).
- ``retrain``: semi-supervised re-training of the 3D network (``run_retrain``, ``evaluate_model``).
- ``infer``: sliding-window inference with the kept 3D network (``load_model``, ``segment_volume``).
- ``pipeline``: the whole run, with its report (``run_pipeline``).
- ``evaluate``: score prediction folders against ground truth.
"""
