"""Summarizing py-spy's collapsed stacks of authz."""

from __future__ import annotations

import pytest

from bench.profile import (
    NATIVE_LOOP_STAGE,
    Frame,
    format_profile,
    library,
    parse_collapsed,
    summarize_profile,
)

MAIN = ";".join(
    [
        "_run_module_as_main (<frozen runpy>:198)",
        "main (authz/tools/cli.py:311)",
        "Runner.run (asyncio/runners.py:118)",
    ]
)
CHECK = f"{MAIN};Authorizer.check (authz/core/authorizer.py:168)"
OPA = f"{CHECK};OpaClient.evaluate (authz/core/opa.py:128)"
IDLE = ";".join(
    [
        "Thread._bootstrap (threading.py:1002)",
        "Thread.run (threading.py:982)",
        "Queue.get (queue.py:180)",
        "Condition.wait (threading.py:331)",
    ]
)
RAW = f"""\
{CHECK};build_input (authz/core/input.py:230);MessageToDict (google/protobuf/json_format.py:1) 30
{OPA};dumps (json/__init__.py:231) 20
{OPA};ClientSession._request (aiohttp/client.py:619) 10
{MAIN};Authorizer.check (authz/core/authorizer.py:170) 10
{MAIN} 30
{IDLE} 50
not a sample line
"""


def test_parse_collapsed() -> None:
    profile = parse_collapsed(RAW.splitlines())
    assert profile.samples == 150
    frames, count = profile.stacks[0]
    assert count == 30
    assert frames[0] == Frame("_run_module_as_main", "<frozen runpy>")
    assert frames[-1] == Frame("MessageToDict", "google/protobuf/json_format.py")


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("grpc/aio/_server.py", "grpc"),
        ("google/protobuf/json_format.py", "protobuf"),
        ("aiohttp/client.py", "aiohttp"),
        ("json/encoder.py", "json"),
        ("asyncio/runners.py", "asyncio/uvloop"),
        ("authz/core/input.py", "authz"),
        ("<frozen runpy>", "other"),
    ],
)
def test_library(path: str, name: str) -> None:
    assert library(path) == name


def test_summary_by_stage_and_library() -> None:
    summary = summarize_profile(parse_collapsed(RAW.splitlines()))
    assert summary["samples"] == 150
    assert summary["idle_samples"] == 50
    # Shares of the 100 active samples.
    assert summary["by_stage"] == {
        "input building (CheckRequest -> input)": 30.0,
        "OPA call (HTTP client, JSON)": 30.0,
        NATIVE_LOOP_STAGE: 30.0,
        "pipeline glue (authorizer)": 10.0,
    }
    assert summary["by_library"]["protobuf"] == 30.0
    assert summary["by_library"]["json"] == 20.0
    assert summary["by_library"]["aiohttp"] == 10.0
    assert summary["by_library"]["authz"] == 70.0
    assert "other" not in summary["by_library"]
    assert summary["top_leaf_functions"]["Runner.run (asyncio/runners.py)"] == 30.0


def test_format_profile() -> None:
    text = format_profile(summarize_profile(parse_collapsed(RAW.splitlines())))
    assert text.startswith("samples: 150 (50 idle-thread samples left out)")
    assert "   30.0%  input building (CheckRequest -> input)" in text
