"""Faster R-CNN detection of tumour cells in BreCaHAD H&E images, tracked with MLflow and tuned with Optuna.

Stages, in the data's order: data -> split -> sampling -> model -> engine -> inference ->
postprocess -> tta -> matching/metrics -> tracking -> tune -> compare -> promote -> predict.
`python -m detection --help` lists the commands.
"""

__version__ = "0.1.0"
