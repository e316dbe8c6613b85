"""One error hierarchy for everything that can be wrong with a model repository.

Every message names the repository file (or manifest key) at fault and what is wrong
with it. The base class is a :class:`ValueError`: a bad repository is bad input, and
callers that already handle ``ValueError`` (the CLI) report it cleanly.
"""

from __future__ import annotations


class ModelRepositoryError(ValueError):
    """A model repository cannot be used as it is."""


class ManifestError(ModelRepositoryError):
    """``manifest.json`` is missing, not JSON, or lacks / mistypes a required key."""


class MissingFileError(ModelRepositoryError):
    """A file the manifest lists is not in the repository."""


class ChecksumError(ModelRepositoryError):
    """A file's sha256 differs from the one recorded in the manifest."""


class ModelFileError(ModelRepositoryError):
    """A model file is not a loadable ONNX graph (truncated, corrupted, wrong format)."""


class SignatureError(ModelRepositoryError):
    """A graph's inputs or outputs disagree with the signature in the manifest."""


class GoldenMismatchError(ModelRepositoryError):
    """A graph's output on the stored golden batch is outside the manifest's tolerance."""


class ExportError(ValueError):
    """An export was refused (the output exists) or failed a check that it runs before
    writing the repository; nothing is left at the output path."""
