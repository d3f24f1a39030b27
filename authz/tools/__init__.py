"""What an operator runs offline: the CLI, keys and key health, replay, config
generators.

Imports :mod:`authz.core` and :mod:`authz.runtime`, never :mod:`authz.stack`.
"""
