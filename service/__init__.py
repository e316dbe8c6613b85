"""mmrank ranking service (FastAPI): no torch, no training code."""
