"""Unit tests of authz.core: one file per module."""
