"""Hardening (issue 7): faults injected for real into a running service, overload,
soak; the ``mmrank reliability`` commands and the pieces tests/reliability reuses."""
