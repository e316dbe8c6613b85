"""Data for training and evaluation: the synthetic world, MovieLens-100K, and their
common in-memory form (:mod:`data.dataset`). Numpy only; no torch."""
