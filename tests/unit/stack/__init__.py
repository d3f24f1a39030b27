"""Unit tests of authz.stack: one file per module."""
