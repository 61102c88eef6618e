"""Trained reference models: small denoisers trained on this machine on real data, shipped as
fp16 safetensors under ``experiments/reference/weights/``, so that the demo, the tests and the
quality study measure image quality, not just drift on random weights. Each has a model YAML
in ``conf/model/`` whose builder loads the shipped weights, and trains with
``python -m experiments.train --config-name <model>``.

* :mod:`.model` -- what they share: class tokens, weights I/O, the builder,
  :class:`~.model.ReferenceModel` and :func:`~.model.load`.
* :mod:`.digits` -- model 1: SD-1.5-layout UNet on scikit-learn's handwritten digits.
* :mod:`.patches` -- model 2: a larger UNet on 32x32 patches of scikit-image's photographs.
* :mod:`.training` -- loss, EMA, learning-rate schedule, checkpoints.

Plain modules: no Hydra (STYLE 5).
"""
from experiments.reference.model import ReferenceModel, load

__all__ = ["ReferenceModel", "load"]
