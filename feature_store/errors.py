"""The feature store's errors. Every one is a ``FeatureStoreError``; the service maps
:class:`StoreUnavailable` to 503 and the others to a refused load or a degraded
response. ``ValueError`` subclasses where the cause is bad input (clean CLI exit)."""

from __future__ import annotations


class FeatureStoreError(Exception):
    """Base class of every feature-store error."""


class StoreUnavailable(FeatureStoreError):
    """Redis did not answer within the configured timeouts and retries."""


class VersionError(FeatureStoreError, ValueError):
    """No current version, or a version whose manifest is missing or unreadable."""


class RecordError(FeatureStoreError, ValueError):
    """Records or a manifest that do not match the record layout."""


class LoadError(FeatureStoreError):
    """A load that did not complete; the pointer was not flipped."""
