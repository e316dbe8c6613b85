"""mmrank: ranking inference for multimodal CVR models (CameNN, EM3)."""

__version__ = "0.1.0"
