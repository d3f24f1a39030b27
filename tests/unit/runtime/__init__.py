"""Unit tests of authz.runtime: one file per module."""
