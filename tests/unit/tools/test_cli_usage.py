"""The command lines as an operator meets them: every verb and option described, ``--version``,
exit codes that mean one thing each (documented in ``--help`` and the README), and
``--json`` output a script can parse.

Covers ``authz`` (:mod:`authz.tools.cli`), the generators (``authz generate ...`` and their
``python -m`` forms) and the local stack's ``python -m authz.stack``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import sqlite3
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import authz
import authz.tools.replay
from authz.core.input import build_input
from authz.core.record import DecisionRecord
from authz.runtime.audit import AuditTrail
from authz.runtime.config import DEFAULT_CREDENTIAL_HEADERS
from authz.tools import cli
from authz.tools.replay import ReplayChange, ReplayReport
from tests.helpers.fakes import check_request

ROOT = Path(__file__).resolve().parents[3]
GATEWAY = "authz/gateway/decision"

# Every leaf command of `authz`, as typed. A new verb must be added here (and so gets the
# checks below): test_verbs_are_the_listed_ones fails until it is.
VERBS: list[tuple[str, ...]] = [
    ("serve",),
    ("key", "new"),
    ("key", "hash"),
    ("key", "health"),
    ("sandbox", "new"),
    ("secrets", "generate"),
    ("lint-data",),
    ("audit", "tail"),
    ("audit", "verify"),
    ("audit", "replay"),
    ("generate", "deploy"),
    ("generate", "egress-envoy"),
]
GROUPS: list[tuple[str, ...]] = [("key",), ("sandbox",), ("secrets",), ("audit",), ("generate",)]
VERB_IDS = [" ".join(verb) for verb in VERBS]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """name -> (the one-line help shown in the parent's listing, the subparser); aliases
    are left out."""
    found: dict[str, tuple[str, argparse.ArgumentParser]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if name in helps:
                    found[name] = (helps[name], sub)
    return found


def _walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], str, argparse.ArgumentParser]]:
    """(path, listing help, parser) for every command under ``parser``, depth first."""
    for name, (summary, sub) in _subcommands(parser).items():
        yield (*path, name), summary, sub
        yield from _walk(sub, (*path, name))


def _help_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 0, err
    return out


# --- descriptions ------------------------------------------------------------------------


def test_verbs_are_the_listed_ones() -> None:
    commands = {path for path, _, sub in _walk(cli.build_parser()) if not _subcommands(sub)}
    assert commands == set(VERBS)


@pytest.mark.parametrize("path", VERBS + GROUPS, ids=VERB_IDS + [g[0] for g in GROUPS])
def test_every_command_has_a_one_line_description(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    listing = {p: (summary, sub) for p, summary, sub in _walk(cli.build_parser())}
    summary, sub = listing[path]
    assert summary, f"{' '.join(path)}: no help= in its parent's listing"
    assert sub.description, f"{' '.join(path)}: no description="
    assert "\n" not in summary
    out = _help_of([*path, "--help"], capsys)
    assert out.startswith(f"usage: authz {' '.join(path)}")
    assert " ".join(sub.description.split()) in " ".join(out.split())


def test_top_level_help_describes_authz_not_the_module(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help_of(["--help"], capsys)
    assert out.startswith("usage: authz")
    text = " ".join(out.split())
    assert cli.DESCRIPTION in text
    assert "argument parsing only" not in out  # the module docstring is for readers of cli.py
    for name, (summary, _) in _subcommands(cli.build_parser()).items():
        assert re.search(rf"^    {re.escape(name)}\b", out, re.MULTILINE), name
        assert " ".join(summary.split()) in text
    assert "exit codes:" in out


def _parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield "authz", cli.build_parser()
    for path, _, sub in _walk(cli.build_parser()):
        yield f"authz {' '.join(path)}", sub
    for module in ("authz.tools.deploy", "authz.tools.egress_envoy", "authz.stack.__main__"):
        yield module, importlib.import_module(module).build_parser()


PARSERS = dict(_parsers())


@pytest.mark.parametrize("name", list(PARSERS), ids=list(PARSERS))
def test_every_option_has_help_text(name: str) -> None:
    parser = PARSERS[name]
    missing = [
        "/".join(action.option_strings) or action.dest
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not action.help
    ]
    assert missing == [], f"{name}: options without help text"


# --- --version ---------------------------------------------------------------------------


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help_of(["--version"], capsys)
    assert out == f"authz {authz.__version__}\n"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert authz.__version__ == pyproject["project"]["version"]


# --- the generators and the local stack ----------------------------------------------------


@pytest.mark.parametrize(
    ("module", "prog"),
    [
        ("authz.tools.deploy", "python -m authz.tools.deploy"),
        ("authz.tools.egress_envoy", "python -m authz.tools.egress_envoy"),
        ("authz.stack.__main__", "python -m authz.stack"),
    ],
    ids=["deploy", "egress-envoy", "stack"],
)
def test_python_m_usage_names_the_command_to_type(
    module: str, prog: str, capsys: pytest.CaptureFixture[str]
) -> None:
    main: Callable[[list[str]], int] = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {prog} ")
    assert "exit codes:" in out


def test_generate_egress_envoy_writes_what_python_m_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from authz.tools import egress_envoy

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.json").write_bytes((ROOT / egress_envoy.DEFAULT_SERVICES).read_bytes())
    args = ["--services", "data.json", "--out", "{out}"]
    assert egress_envoy.main([a.format(out="direct.yaml") for a in args]) == 0
    verb = ["generate", "egress-envoy"]
    assert cli.main([*verb, *(a.format(out="verb.yaml") for a in args), "--check"]) == 1
    assert cli.main([*verb, *(a.format(out="verb.yaml") for a in args)]) == 0
    assert cli.main([*verb, *(a.format(out="verb.yaml") for a in args), "--check"]) == 0
    direct = (tmp_path / "direct.yaml").read_text(encoding="utf-8")
    assert direct == (tmp_path / "verb.yaml").read_text(encoding="utf-8").replace(
        "verb.yaml", "direct.yaml"
    )


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["generate", "deploy", "--root", str(ROOT), "--check"], 0),
        (["generate", "deploy", "--root", "{empty}", "--check"], 2),
        (["generate", "egress-envoy", "--services", "{empty}/none.json"], 2),
    ],
    ids=["deploy-up-to-date", "deploy-no-sources", "egress-no-services"],
)
def test_generate_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int
) -> None:
    assert cli.main([a.format(empty=tmp_path) for a in argv]) == code
    if code == 2:
        assert "error:" in capsys.readouterr().err


def test_generate_without_a_tool_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate"])
    assert exc.value.code == 2
    assert "usage: authz generate" in capsys.readouterr().err


# --- audit verify --json -----------------------------------------------------------------


def _record(decision_id: str, *, allowed: bool, reason: str) -> DecisionRecord:
    document = build_input(check_request(), DEFAULT_CREDENTIAL_HEADERS)
    return DecisionRecord(
        decision_id=decision_id,
        timestamp=1_760_000_000.0,
        decision_path=GATEWAY,
        allowed=allowed,
        reason=reason,
        http_status=200 if allowed else 403,
        policy_allowed=allowed,
        policy_reason=reason,
        document=document,
    )


@pytest.fixture
def audit_db(tmp_path: Path) -> Path:
    """An audit trail with two decisions."""
    path = tmp_path / "audit.db"
    trail = AuditTrail(path, retention_days=None)
    trail.record(_record("d-1", allowed=True, reason="allowed"))
    trail.record(_record("d-2", allowed=False, reason="missing_api_key"))
    trail.close()
    return path


def _tamper(db: Path) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE audit SET body = replace(body, 'allowed', 'ALLOWED') WHERE seq = 1")


@pytest.mark.parametrize("tampered", [False, True], ids=["intact", "tampered"])
def test_audit_verify_json(
    audit_db: Path, capsys: pytest.CaptureFixture[str], tampered: bool
) -> None:
    if tampered:
        _tamper(audit_db)
    code = cli.main(["audit", "verify", "--db", str(audit_db), "--json"])
    out, _ = capsys.readouterr()
    report = json.loads(out)
    if tampered:
        assert (code, report["ok"], report["broken_seq"]) == (1, False, 1)
        assert report["problem"]
    else:
        assert (code, report["ok"], report["entries"], report["broken_seq"]) == (0, True, 2, None)


@pytest.mark.parametrize("tampered", [False, True], ids=["intact", "tampered"])
def test_audit_verify_text_exit_codes(
    audit_db: Path, capsys: pytest.CaptureFixture[str], tampered: bool
) -> None:
    if tampered:
        _tamper(audit_db)
    assert cli.main(["audit", "verify", "--db", str(audit_db)]) == (1 if tampered else 0)
    out, err = capsys.readouterr()
    assert ("BROKEN at entry 1" in err) is tampered
    assert out.startswith("ok: 2 entries") is not tampered


# --- audit replay: exit codes and --json -------------------------------------------------


def _change(decision_id: str, before: str, after: str) -> ReplayChange:
    return ReplayChange(1, decision_id, "t", GATEWAY, {"key_id": "key-a"}, before, after)


UNCHANGED = ReplayReport(evaluated=2, unchanged=2)
CHANGED = ReplayReport(
    evaluated=2,
    unchanged=1,
    changed=[_change("d-1", "allow (allowed)", "deny (disabled_api_key)")],
)
ERRORED = ReplayReport(
    evaluated=2,
    unchanged=1,
    errors=1,
    changed=[_change("d-1", "allow (allowed)", "error (opa_bad_response)")],
)


@pytest.fixture
def fake_replay(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., Path]:
    """Replace the throwaway OPA and the replay with fakes: the CLI's exit code and output
    are under test here (tests/integration/test_replay.py runs the real thing). Returns a
    function taking the report to return (or the error OPA's start raises) and giving
    the bundle path to pass."""
    bundle = tmp_path / "other.tar.gz"
    bundle.write_bytes(b"not read by the fakes")
    monkeypatch.setenv("AUTHZ_OPA_BIN", "/bin/true")

    def arrange(result: ReplayReport | Exception) -> Path:
        @contextlib.contextmanager
        def opa_serving(*_: object, **__: object) -> Iterator[str]:
            if isinstance(result, Exception):
                raise result
            yield "http://127.0.0.1:9"

        async def replay(entries: Any, engine: Any, *_: object) -> ReplayReport:
            assert isinstance(result, ReplayReport)
            assert [e.decision_id for e in entries] == ["d-1", "d-2"]
            return result

        monkeypatch.setattr(authz.tools.replay, "opa_serving", opa_serving)
        monkeypatch.setattr(authz.tools.replay, "replay", replay)
        return bundle

    return arrange


@pytest.mark.parametrize(
    ("result", "code"),
    [
        (UNCHANGED, 0),
        (CHANGED, 1),
        (ERRORED, 1),
        (RuntimeError("OPA exited: bad bundle"), 2),
    ],
    ids=["unchanged", "changed", "evaluation-error-counts-as-changed", "opa-did-not-start"],
)
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_audit_replay_exit_codes(
    audit_db: Path,
    fake_replay: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    result: ReplayReport | Exception,
    code: int,
    as_json: bool,
) -> None:
    bundle = fake_replay(result)
    argv = ["audit", "--db", str(audit_db), "replay", "--bundle", str(bundle)]
    assert cli.main([*argv, "--json"] if as_json else argv) == code
    out, err = capsys.readouterr()
    if isinstance(result, Exception):
        assert (out, "OPA exited" in err) == ("", True)
    elif as_json:
        report = json.loads(out)
        assert {k: report[k] for k in ("evaluated", "unchanged", "errors", "skipped")} == {
            "evaluated": result.evaluated,
            "unchanged": result.unchanged,
            "errors": result.errors,
            "skipped": result.skipped,
        }
        assert [(c["decision_id"], c["before"], c["after"]) for c in report["changed"]] == [
            (c.decision_id, c.before, c.after) for c in result.changed
        ]
    else:
        assert out.splitlines()[0] == result.summary()
        assert len(out.splitlines()) == 1 + len(result.changed)


@pytest.mark.parametrize(
    "argv",
    [
        ["audit", "--db", "{db}", "replay", "--bundle", "{missing}"],
        ["audit", "--db", "{missing}", "replay", "--bundle", "{bundle}"],
    ],
    ids=["no-bundle", "no-database"],
)
def test_audit_replay_that_cannot_run_exits_2(
    audit_db: Path,
    tmp_path: Path,
    fake_replay: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    bundle = fake_replay(CHANGED)
    missing = tmp_path / "missing"
    args = [a.format(db=audit_db, missing=missing, bundle=bundle) for a in argv]
    assert cli.main([*args, "--json"]) == 2
    out, err = capsys.readouterr()
    assert (out, "error:" in err) == ("", True)


# --- exit codes documented --------------------------------------------------------------


def test_readme_shows_the_exit_codes_of_help() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert cli.EXIT_CODES.strip() in readme


# verb -> the exit codes its --help documents: the checks use 1 for "found something".
CODES = {
    ("serve",): {0, 2},
    ("key", "new"): {0, 2},
    ("key", "hash"): {0, 2},
    ("key", "health"): {0, 1, 2},
    ("sandbox", "new"): {0, 2},
    ("secrets", "generate"): {0, 1, 2},
    ("lint-data",): {0, 1},
    ("audit", "tail"): {0, 2},
    ("audit", "verify"): {0, 1, 2},
    ("audit", "replay"): {0, 1, 2},
    ("generate", "deploy"): {0, 1, 2},
    ("generate", "egress-envoy"): {0, 1, 2},
}


def test_codes_table_covers_every_verb() -> None:
    assert set(CODES) == set(VERBS)


@pytest.mark.parametrize("path", VERBS, ids=VERB_IDS)
def test_every_verb_documents_its_exit_codes(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    out = _help_of([*path, "--help"], capsys)
    assert "exit codes:" in out, f"{' '.join(path)} --help has no exit codes"
    epilog = out[out.index("exit codes:") :].splitlines()[1:]
    documented = {int(line.split()[0]) for line in epilog if re.match(r"  \d  \S", line)}
    assert documented == CODES[path]


@pytest.mark.parametrize(
    "argv",
    [
        ["audit", "tail", "--limit", "0"],
        ["audit", "tail", "--limit", "-1"],
        ["audit", "tail", "--limit", "many"],
        ["audit", "replay", "--bundle", "b.tar.gz", "--limit", "0"],
    ],
    ids=["tail-zero", "tail-negative", "tail-not-a-number", "replay-zero"],
)
def test_limit_must_be_a_positive_count(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # SQLite reads LIMIT -1 as "no limit": a typo must not turn into the whole trail.
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "--limit" in capsys.readouterr().err
