"""Builders shared by the test suites: fakes for the core's I/O, stand-in and real servers,
data files. Test modules import from here, never from one another."""

from __future__ import annotations

from pathlib import Path

# The repository checkout.
ROOT = Path(__file__).resolve().parents[2]
