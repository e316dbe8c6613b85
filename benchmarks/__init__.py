"""Benchmarks that compare mmrank with other ways of serving the same model (``mmrank bench``)."""
