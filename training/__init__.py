"""Training and evaluation of the models in :mod:`models` on :mod:`data` datasets."""
