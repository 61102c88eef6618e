"""Trained reference models: small denoisers trained on this machine on real data, shipped as
safetensors under ``assets/``, so that the demo and the tests measure image quality, not just
drift on random weights. Each has a model YAML in ``conf/model/`` whose builder loads the
shipped weights, and a training entry point under ``experiments/``.

* :mod:`reference.digits` -- class-conditional SD-1.5-layout UNet on scikit-learn's handwritten
  digits, with a classifier that scores the samples (``conf/model/digits.yaml``,
  ``experiments/train_digits.py``).

Plain modules: no Hydra (STYLE 5).
"""
