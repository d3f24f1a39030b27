"""The long-running service around the pipeline: settings, gRPC server and its
lifecycle, admin API, caches, rate limiters, secrets, overrides, logs, metrics, audit.

Imports :mod:`authz.core` only, never :mod:`authz.tools` or :mod:`authz.stack`.
"""
