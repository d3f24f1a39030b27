"""The decision pipeline: CheckRequest -> input -> OPA -> decision -> CheckResponse.

Pure functions, values and Protocols; imports nothing else of authz (checked by
import-linter, ``pyproject.toml``).
"""
