"""Unit tests of authz.tools: one file per module."""
