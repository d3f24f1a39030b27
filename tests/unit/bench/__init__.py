"""Unit tests of the benchmark (bench/): one file per module."""
