"""authz.runtime.config: defaults < YAML file < AUTHZ_* environment; every bad value names its key.

The environment is always passed in as a mapping; these tests never read or write
``os.environ``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.core.errors import ConfigError
from authz.core.headers import CREDENTIAL_HEADERS, IDENTITY_HEADERS
from authz.core.input import BodyParsing
from authz.core.mode import Mode
from authz.core.opa import parse_decision_path
from authz.core.secret import Secret
from authz.runtime.config import (
    DEFAULT_CREDENTIAL_HEADERS,
    Settings,
    is_loopback_host,
    load,
    sources,
    unknown_variables,
)

TOKEN = "opa-t0ken-5f4e3d2c1b0a"


def write(tmp_path: Path, text: str, name: str = "authz.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    settings = load({})
    assert settings == Settings()
    # The documented defaults (config.py comments, docs/contract.md, the infra ports).
    assert settings.grpc_addr == "127.0.0.1:9191"
    assert settings.admin_addr == "127.0.0.1:9192"
    assert settings.opa_url == "http://127.0.0.1:8181"
    assert settings.opa_token is None
    assert settings.default_decision_path == "authz/gateway/decision"
    # Stays inside Envoy's 500 ms ext_authz timeout so authz decides what clients see.
    assert 0 < settings.decision_timeout_ms < 500
    assert settings.decision_timeout_s == settings.decision_timeout_ms / 1000
    assert {"x-api-key", "authorization", "x-sandbox-token"} <= set(settings.credential_headers)
    assert all(name == name.lower() for name in settings.credential_headers)
    # A body is parsed only where a route asks (context_extensions parse_body).
    assert settings.parse_body is BodyParsing.ROUTE
    assert settings.log_level == "INFO"
    assert settings.decision_log is True
    # authz's own line unless told (README "Decision log").
    assert settings.decision_log_format == "authz"


class RecordingEnviron(Mapping[str, str]):
    """A mapping that records which keys load() looked up."""

    def __init__(self, values: dict[str, str]) -> None:
        self._values = values
        self.looked_up: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.looked_up.add(key)
        return self._values[key]

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.looked_up.add(key)
        return key in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def test_environment_is_the_parameter_only() -> None:
    environ = RecordingEnviron({"AUTHZ_GRPC_ADDR": "127.0.0.2:7000", "GRPC_ADDR": "1.1.1.1:1"})
    assert load(environ).grpc_addr == "127.0.0.2:7000"
    assert "AUTHZ_GRPC_ADDR" in environ.looked_up
    assert all(key.startswith("AUTHZ_") for key in environ.looked_up)


ENV_CASES: list[tuple[str, str, str, Any]] = [
    # (variable, value, Settings attribute, converted value)
    ("AUTHZ_GRPC_ADDR", "localhost:9000", "grpc_addr", "localhost:9000"),
    ("AUTHZ_GRPC_ADDR", "[::1]:9000", "grpc_addr", "[::1]:9000"),
    ("AUTHZ_ADMIN_ADDR", "localhost:0", "admin_addr", "localhost:0"),
    ("AUTHZ_OPA_URL", "https://opa.internal:8443/", "opa_url", "https://opa.internal:8443"),
    ("AUTHZ_OPA_URL", "unix:///run/opa/opa.sock", "opa_url", "unix:///run/opa/opa.sock"),
    ("AUTHZ_OPA_POOL_SIZE", "8", "opa_pool_size", 8),
    (
        "AUTHZ_DEFAULT_DECISION_PATH",
        "authz/egress/decision",
        "default_decision_path",
        "authz/egress/decision",
    ),
    ("AUTHZ_DECISION_TIMEOUT_MS", "150", "decision_timeout_ms", 150),
    (
        "AUTHZ_CREDENTIAL_HEADERS",
        "X-Upstream-Token, Authorization ,,",
        "credential_headers",
        (*CREDENTIAL_HEADERS, "x-upstream-token"),
    ),
    ("AUTHZ_PARSE_BODY", "false", "parse_body", BodyParsing.NEVER),
    ("AUTHZ_PARSE_BODY", "0", "parse_body", BodyParsing.NEVER),
    ("AUTHZ_PARSE_BODY", "always", "parse_body", BodyParsing.ALWAYS),
    ("AUTHZ_DECISION_LOG", "off", "decision_log", False),
    ("AUTHZ_UVLOOP", "No", "uvloop", False),
    ("AUTHZ_UVLOOP", "yes", "uvloop", True),
    ("AUTHZ_SHUTDOWN_GRACE_S", "0.5", "shutdown_grace_s", 0.5),
    ("AUTHZ_SHUTDOWN_GRACE_S", "0", "shutdown_grace_s", 0.0),
    ("AUTHZ_LOG_LEVEL", "debug", "log_level", "DEBUG"),
    ("AUTHZ_DECISION_LOG_FORMAT", "opa", "decision_log_format", "opa"),
    ("AUTHZ_JWT_PASSTHROUGH", "false", "jwt_passthrough", False),
    ("AUTHZ_PROTO_DESCRIPTOR", "/etc/authz/api.pb", "proto_descriptor", Path("/etc/authz/api.pb")),
    ("AUTHZ_DECISION_LOG_FORMAT", " OPA ", "decision_log_format", "opa"),
    ("AUTHZ_DECISION_LOG_FORMAT", "authz", "decision_log_format", "authz"),
]


@pytest.mark.parametrize(
    ("variable", "value", "attribute", "expected"),
    ENV_CASES,
    ids=[f"{case[0]}={case[1]}" for case in ENV_CASES],
)
def test_environment_overrides(variable: str, value: str, attribute: str, expected: Any) -> None:
    assert getattr(load({variable: value}), attribute) == expected


def test_opa_token_from_environment_is_a_secret() -> None:
    settings = load({"AUTHZ_OPA_TOKEN": TOKEN})
    assert isinstance(settings.opa_token, Secret)
    assert settings.opa_token.reveal() == TOKEN
    assert load({"AUTHZ_OPA_TOKEN": ""}).opa_token is None


def test_yaml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "grpc_addr: 0.0.0.0:9000\n"
        "grpc_allow_plaintext: true\n"
        "opa_pool_size: 16\n"
        "decision_timeout_ms: 250\n"
        "credential_headers: [X-Upstream-Token, authorization]\n"
        "parse_body: false\n"
        "shutdown_grace_s: 2\n"
        f"opa_token: {TOKEN}\n",
    )
    settings = load({}, path)
    assert settings.grpc_addr == "0.0.0.0:9000"
    assert settings.opa_pool_size == 16
    assert settings.decision_timeout_ms == 250
    assert settings.credential_headers == (*CREDENTIAL_HEADERS, "x-upstream-token")
    assert settings.parse_body is BodyParsing.NEVER
    assert settings.shutdown_grace_s == 2.0
    assert settings.opa_token == Secret(TOKEN)
    # Keys the file does not set keep their defaults.
    assert settings.admin_addr == Settings().admin_addr


# --- credential headers: authz.core.headers.CREDENTIAL_HEADERS is the one list ----------


def test_credential_headers_default_is_the_one_list() -> None:
    # What the egress policy strips as a credential (Api-Key, X-Goog-Api-Key, ...) is
    # also what reaches OPA and the audit trail only as a digest: one list, no second.
    assert DEFAULT_CREDENTIAL_HEADERS == CREDENTIAL_HEADERS
    assert load({}).credential_headers == CREDENTIAL_HEADERS


CREDENTIAL_HEADER_SETTINGS: list[tuple[str, str, tuple[str, ...]]] = [
    ("only-defaults", "x-api-key,authorization", ()),
    ("adds-one", "x-upstream-token", ("x-upstream-token",)),
    ("adds-without-duplicates", "X-Upstream-Token,cookie,x-upstream-token", ("x-upstream-token",)),
    ("empty-adds-nothing", " , ", ()),
]


@pytest.mark.parametrize(
    ("value", "added"),
    [case[1:] for case in CREDENTIAL_HEADER_SETTINGS],
    ids=[case[0] for case in CREDENTIAL_HEADER_SETTINGS],
)
def test_credential_headers_setting_only_adds_to_the_one_list(
    tmp_path: Path, value: str, added: tuple[str, ...]
) -> None:
    assert load({"AUTHZ_CREDENTIAL_HEADERS": value}).credential_headers == (
        *CREDENTIAL_HEADERS,
        *added,
    )
    listed = [name for name in value.split(",") if name.strip()]
    from_file = load({}, write(tmp_path, f"credential_headers: {listed!r}\n"))
    assert from_file.credential_headers == (*CREDENTIAL_HEADERS, *added)


IGNORED_CREDENTIALS: list[tuple[str, dict[str, str], str]] = [
    # (id, environment, the header the message names)
    ("x-api-key", {"AUTHZ_DECISION_CACHE_IGNORE_HEADERS": "x-request-id,X-Api-Key"}, "x-api-key"),
    ("api-key", {"AUTHZ_DECISION_CACHE_IGNORE_HEADERS": "api-key"}, "api-key"),
    ("goog", {"AUTHZ_DECISION_CACHE_IGNORE_HEADERS": "x-goog-api-key"}, "x-goog-api-key"),
    ("cookie", {"AUTHZ_DECISION_CACHE_IGNORE_HEADERS": "cookie"}, "cookie"),
    (
        "added-credential",
        {
            "AUTHZ_CREDENTIAL_HEADERS": "x-upstream-token",
            "AUTHZ_DECISION_CACHE_IGNORE_HEADERS": "x-upstream-token",
        },
        "x-upstream-token",
    ),
    *[(name, {"AUTHZ_DECISION_CACHE_IGNORE_HEADERS": name}, name) for name in IDENTITY_HEADERS],
]


@pytest.mark.parametrize(
    ("environ", "named"),
    [case[1:] for case in IGNORED_CREDENTIALS],
    ids=[case[0] for case in IGNORED_CREDENTIALS],
)
def test_decision_cache_never_ignores_a_credential_or_identity_header(
    environ: dict[str, str], named: str
) -> None:
    # Ignored in the cache key, two callers with different keys would share a decision.
    with pytest.raises(ConfigError) as caught:
        load(environ)
    message = str(caught.value)
    value = environ["AUTHZ_DECISION_CACHE_IGNORE_HEADERS"]
    assert message.startswith(f"AUTHZ_DECISION_CACHE_IGNORE_HEADERS={value!r}: ")
    assert repr(named) in message


def test_decision_cache_may_ignore_other_headers() -> None:
    settings = load({"AUTHZ_DECISION_CACHE_IGNORE_HEADERS": "x-request-id,traceparent"})
    assert settings.decision_cache_ignore_headers == ("x-request-id", "traceparent")


@pytest.mark.parametrize("text", ["", "# nothing here\n"], ids=["empty", "comment-only"])
def test_empty_yaml_file_gives_defaults(tmp_path: Path, text: str) -> None:
    assert load({}, write(tmp_path, text)) == Settings()


def test_environment_wins_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, "grpc_addr: 127.0.0.2:9000\nopa_pool_size: 16\n")
    settings = load({"AUTHZ_GRPC_ADDR": "127.0.0.1:7000"}, path)
    assert settings.grpc_addr == "127.0.0.1:7000"
    assert settings.opa_pool_size == 16


def test_environment_overrides_a_bad_file_value(tmp_path: Path) -> None:
    # The file value is never converted when the environment replaces it.
    path = write(tmp_path, "opa_pool_size: lots\n")
    assert load({"AUTHZ_OPA_POOL_SIZE": "4"}, path).opa_pool_size == 4


BAD_VALUES: list[tuple[str, str, str]] = [
    # (variable, value, what the message says is expected)
    ("AUTHZ_GRPC_ADDR", "9191", "host:port"),
    ("AUTHZ_GRPC_ADDR", ":9191", "host:port"),
    ("AUTHZ_GRPC_ADDR", "localhost:", "host:port"),
    ("AUTHZ_GRPC_ADDR", "localhost:http", "host:port"),
    ("AUTHZ_ADMIN_ADDR", "localhost:65536", "host:port"),
    ("AUTHZ_OPA_URL", "ftp://opa:8181", "http(s) URL"),
    ("AUTHZ_OPA_URL", "127.0.0.1:8181", "http(s) URL"),
    ("AUTHZ_OPA_URL", "http://", "http(s) URL"),
    ("AUTHZ_OPA_URL", "http://opa:8181/?pretty=true", "http(s) URL"),
    ("AUTHZ_OPA_URL", "unix:///", "unix socket path"),
    ("AUTHZ_OPA_URL", "unix:///run/opa/", "unix socket path"),
    ("AUTHZ_OPA_URL", "unix://run/opa.sock", "http(s) URL"),
    ("AUTHZ_OPA_URL", "unix:///run/opa\x00.sock", "unix socket path"),
    ("AUTHZ_OPA_URL", "unix:///" + "s" * 108, "unix socket path"),
    ("AUTHZ_OPA_POOL_SIZE", "many", "integer"),
    ("AUTHZ_OPA_POOL_SIZE", "1.5", "integer"),
    ("AUTHZ_OPA_POOL_SIZE", "0", "1..4096"),
    ("AUTHZ_OPA_POOL_SIZE", "4097", "1..4096"),
    ("AUTHZ_DECISION_TIMEOUT_MS", "0", "1..60000"),
    ("AUTHZ_DECISION_TIMEOUT_MS", "-5", "1..60000"),
    ("AUTHZ_DECISION_TIMEOUT_MS", "fast", "integer"),
    ("AUTHZ_DEFAULT_DECISION_PATH", "/authz/gateway/decision", "OPA data path"),
    ("AUTHZ_DEFAULT_DECISION_PATH", "authz//decision", "OPA data path"),
    ("AUTHZ_DEFAULT_DECISION_PATH", "authz/gateway/decision/", "OPA data path"),
    ("AUTHZ_DEFAULT_DECISION_PATH", "authz/1st", "OPA data path"),
    ("AUTHZ_DEFAULT_DECISION_PATH", "authz/gate-way", "OPA data path"),
    ("AUTHZ_DEFAULT_DECISION_PATH", "authz/gateway/decision\n", "OPA data path"),
    ("AUTHZ_DEFAULT_DECISION_PATH", "", "OPA data path"),
    ("AUTHZ_CREDENTIAL_HEADERS", "x-api-key,bad header", "not a header name"),
    ("AUTHZ_CREDENTIAL_HEADERS", "x:y", "not a header name"),
    ("AUTHZ_PARSE_BODY", "maybe", "route, always or never"),
    ("AUTHZ_DECISION_LOG", "", "true or false"),
    ("AUTHZ_UVLOOP", "2", "true or false"),
    ("AUTHZ_SHUTDOWN_GRACE_S", "soon", "number"),
    ("AUTHZ_SHUTDOWN_GRACE_S", "-1", "non-negative"),
    ("AUTHZ_SHUTDOWN_GRACE_S", "nan", "non-negative"),
    ("AUTHZ_LOG_LEVEL", "verbose", "one of"),
    ("AUTHZ_LOG_LEVEL", "CRITICAL", "one of"),
    ("AUTHZ_DECISION_LOG_FORMAT", "json", "one of authz, opa"),
    ("AUTHZ_DECISION_LOG_FORMAT", "", "one of authz, opa"),
]


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    BAD_VALUES,
    ids=[f"{case[0]}={case[1]!r}" for case in BAD_VALUES],
)
def test_bad_environment_value_names_key_and_value(
    variable: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load({variable: value})
    message = str(caught.value)
    assert variable in message
    assert repr(value) in message
    assert expected in message


@pytest.mark.parametrize(
    ("text", "key", "shown"),
    [
        ("opa_pool_size: 0\n", "opa_pool_size", "0"),
        ("grpc_addr: nowhere\n", "grpc_addr", "'nowhere'"),
        ("parse_body: [1]\n", "parse_body", "[1]"),
        ("credential_headers: ['bad header']\n", "credential_headers", "['bad header']"),
    ],
    ids=["int", "string", "list-for-bool", "bad-header-in-list"],
)
def test_bad_file_value_names_file_key_and_value(
    tmp_path: Path, text: str, key: str, shown: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load({}, write(tmp_path, text, name="config.yaml"))
    assert str(caught.value).startswith(f"config.yaml:{key}={shown}: ")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("grpc_port: 9191\n", "unknown key 'grpc_port'"),
        ("- grpc_addr\n", "expected a mapping"),
        ("grpc_addr: [unclosed\n", "authz.yaml"),
        ("decision_log_drop_paths: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ("# " + "x" * (1024 * 1024) + "\n", "larger than 1048576 bytes"),
    ],
    ids=["unknown-key", "not-a-mapping", "invalid-yaml", "nested-5000", "over-1mib"],
)
def test_bad_file(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=r"config file") as caught:
        load({}, write(tmp_path, text))
    assert fragment in str(caught.value)


def test_settings_file_not_utf8_is_a_config_error_naming_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "authz.yaml"
    path.write_bytes(b"mode: enforce\n\xff\n")
    with pytest.raises(ConfigError, match=r"config file .*authz\.yaml.*: not UTF-8 \(byte 14\)"):
        load({}, path)


def test_sources_reads_the_settings_file_as_load_does_bounded(tmp_path: Path) -> None:
    """``sources`` names the file for the keys it sets; a file grown over the cap since
    :func:`load` is refused as load refuses it, never read whole."""
    path = write(tmp_path, "mode: enforce\n")
    assert sources({}, path)["mode"] == "authz.yaml"
    assert sources({}, path)["grpc_addr"] == "default"
    path.write_text("mode: enforce\n# " + "x" * (1024 * 1024) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="larger than 1048576 bytes"):
        sources({}, path)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=r"absent\.yaml"):
        load({}, missing)


def test_opa_token_is_masked_in_repr() -> None:
    settings = load({"AUTHZ_OPA_TOKEN": TOKEN})
    assert TOKEN not in repr(settings)
    assert TOKEN not in str(settings)
    assert "**********" in repr(settings)


@pytest.mark.parametrize(
    "text",
    [
        # A token with a bad value elsewhere in the file.
        f"opa_token: {TOKEN}\nopa_pool_size: lots\n",
        # YAML syntax errors quote the offending line.
        f'opa_token: "{TOKEN}\n',
        f"opa_token: [{TOKEN}\n",
        f"opa_token: {TOKEN}\n  bad: [\n",
    ],
    ids=["other-key-bad", "unterminated-quote", "unclosed-flow", "bad-indent"],
)
def test_opa_token_is_masked_in_file_errors(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({}, write(tmp_path, text))
    assert TOKEN not in str(caught.value)


def test_opa_token_is_masked_in_environment_errors() -> None:
    with pytest.raises(ConfigError) as caught:
        load({"AUTHZ_OPA_TOKEN": TOKEN, "AUTHZ_LOG_LEVEL": "loud"})
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    "path",
    ["authz/gateway/decision", "a", "_x/y_2/Z"],
    ids=["default", "single-segment", "underscores-digits-caps"],
)
def test_parse_decision_path_accepts_data_paths(path: str) -> None:
    assert parse_decision_path("decision_path", path) == path


def test_parse_decision_path_names_its_key() -> None:
    with pytest.raises(ConfigError, match=r"^decision_path='a\.b': "):
        parse_decision_path("decision_path", "a.b")


def test_settings_are_frozen() -> None:
    settings = load({})
    with pytest.raises(AttributeError):
        settings.grpc_addr = "0.0.0.0:1"  # type: ignore[misc]


# --- day-2 settings: mode, fail-open paths, circuit breaker, admin, audit, Redis ---------

ADMIN_TOKEN = "adm-t0ken-0a1b2c3d4e5f-6a7b8c9d0e1f2a3b"
REDIS_PASSWORD = "r3dis-pw-9z8y7x"
REDIS_URL = f"redis://:{REDIS_PASSWORD}@redis.internal:6379/0"


@pytest.mark.parametrize(
    ("environ", "mode", "allow_bypass"),
    [
        ({}, Mode.ENFORCE, False),
        ({"AUTHZ_MODE": "enforce"}, Mode.ENFORCE, False),
        ({"AUTHZ_MODE": "dry-run"}, Mode.DRY_RUN, False),
        ({"AUTHZ_MODE": "DRY_RUN"}, Mode.DRY_RUN, False),
        ({"AUTHZ_MODE": "bypass", "AUTHZ_ALLOW_BYPASS": "true"}, Mode.BYPASS, True),
        ({"AUTHZ_MODE": "enforce", "AUTHZ_ALLOW_BYPASS": "1"}, Mode.ENFORCE, True),
    ],
    ids=["default", "enforce", "dry-run", "dry-run-underscore", "bypass-allowed", "allow-only"],
)
def test_mode(environ: dict[str, str], mode: Mode, allow_bypass: bool) -> None:
    settings = load(environ)
    assert (settings.mode, settings.allow_bypass) == (mode, allow_bypass)


@pytest.mark.parametrize(
    "environ",
    [
        {"AUTHZ_MODE": "bypass"},
        {"AUTHZ_MODE": "bypass", "AUTHZ_ALLOW_BYPASS": "false"},
    ],
    ids=["not-set", "false"],
)
def test_bypass_requires_allow_bypass(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load(environ)
    assert "AUTHZ_MODE" in str(caught.value)
    assert "AUTHZ_ALLOW_BYPASS" in str(caught.value)


def test_bypass_from_file_requires_allow_bypass(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="AUTHZ_ALLOW_BYPASS"):
        load({}, write(tmp_path, "mode: bypass\n"))
    assert load({}, write(tmp_path, "mode: bypass\nallow_bypass: true\n")).mode is Mode.BYPASS


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("AUTHZ_MODE", "audit", "one of"),
        ("AUTHZ_MODE", "", "one of"),
        ("AUTHZ_ALLOW_BYPASS", "perhaps", "true or false"),
        ("AUTHZ_FAIL_OPEN_PATHS", "/authz/egress/decision", "OPA data path"),
        ("AUTHZ_FAIL_OPEN_PATHS", "authz/egress/decision,authz.gateway", "OPA data path"),
        ("AUTHZ_CIRCUIT_FAILURE_THRESHOLD", "0", "1..1000"),
        ("AUTHZ_CIRCUIT_FAILURE_THRESHOLD", "1001", "1..1000"),
        ("AUTHZ_CIRCUIT_FAILURE_THRESHOLD", "-1", "1..1000"),
        ("AUTHZ_CIRCUIT_FAILURE_THRESHOLD", "five", "integer"),
        ("AUTHZ_RATE_LIMIT_BACKEND", "memcached", "memory, redis"),
        ("AUTHZ_AUDIT_DB", "audit\x00.db", "not a file path"),
    ],
    ids=[
        "mode-unknown",
        "mode-empty",
        "allow-bypass-not-bool",
        "fail-open-leading-slash",
        "fail-open-second-bad",
        "threshold-0",
        "threshold-1001",
        "threshold-negative",
        "threshold-word",
        "backend-unknown",
        "audit-db-nul",
    ],
)
def test_day2_bad_values_name_the_key(variable: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({variable: value})
    assert variable in str(caught.value)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("value", "paths"),
    [
        ("", ()),
        ("authz/egress/decision", ("authz/egress/decision",)),
        (
            " authz/egress/decision , authz/gateway/decision ,",
            ("authz/egress/decision", "authz/gateway/decision"),
        ),
    ],
    ids=["empty", "one", "two-with-spaces"],
)
def test_fail_open_paths(value: str, paths: tuple[str, ...]) -> None:
    assert load({"AUTHZ_FAIL_OPEN_PATHS": value}).fail_open_paths == paths


def test_fail_open_paths_default_and_file_list(tmp_path: Path) -> None:
    assert load({}).fail_open_paths == ()
    path = write(tmp_path, "fail_open_paths: [authz/egress/decision]\n")
    assert load({}, path).fail_open_paths == ("authz/egress/decision",)


def test_fail_open_path_error_names_the_bad_path() -> None:
    with pytest.raises(ConfigError) as caught:
        load({"AUTHZ_FAIL_OPEN_PATHS": "authz/egress/decision,/bad/path"})
    assert "'/bad/path'" in str(caught.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", 1), ("1000", 1000), ("7", 7)],
    ids=["min", "max", "middle"],
)
def test_circuit_failure_threshold(value: str, expected: int) -> None:
    assert load({"AUTHZ_CIRCUIT_FAILURE_THRESHOLD": value}).circuit_failure_threshold == expected


def test_circuit_failure_threshold_default() -> None:
    assert load({}).circuit_failure_threshold == 5


def test_admin_token_is_a_masked_secret() -> None:
    settings = load({"AUTHZ_ADMIN_TOKEN": ADMIN_TOKEN})
    assert isinstance(settings.admin_token, Secret)
    assert settings.admin_token.reveal() == ADMIN_TOKEN
    assert ADMIN_TOKEN not in repr(settings)
    assert ADMIN_TOKEN not in str(settings)
    assert load({}).admin_token is None
    assert load({"AUTHZ_ADMIN_TOKEN": ""}).admin_token is None


@pytest.mark.parametrize(
    "text",
    [
        f"admin_token: {ADMIN_TOKEN}\nopa_pool_size: lots\n",
        f'admin_token: "{ADMIN_TOKEN}\n',
        f"admin_token: [{ADMIN_TOKEN}\n",
    ],
    ids=["other-key-bad", "unterminated-quote", "unclosed-flow"],
)
def test_admin_token_masked_in_file_errors(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({}, write(tmp_path, text))
    assert ADMIN_TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    "token",
    ["%", "short-admin-token", "adm-t0ken-0a1b2c3d4e5f", "k" * 31, " " * 40, "ab" * 15 + "\n\t"],
    ids=["1-char", "17-chars", "22-chars", "31-chars", "blank", "padded-to-32"],
)
@pytest.mark.parametrize("source", ["env", "file"])
def test_admin_token_shorter_than_32_characters_is_refused_without_printing_it(
    tmp_path: Path, token: str, source: str
) -> None:
    if source == "env":
        environ, path, key = {"AUTHZ_ADMIN_TOKEN": token}, None, "AUTHZ_ADMIN_TOKEN"
    else:
        environ, key = {}, "admin_token"
        path = write(tmp_path, yaml.safe_dump({"admin_token": token}))
    with pytest.raises(ConfigError, match="at least 32 characters") as caught:
        load(environ, path)
    message = str(caught.value)
    assert key in message
    assert "<redacted>" in message
    assert not token.strip() or token.strip() not in message


@pytest.mark.parametrize(
    "token",
    [
        "k" * 20 + " " + "k" * 20,
        "k" * 40 + "é",
        "k" * 40 + "\udcff",  # an invalid UTF-8 byte in the environment (surrogateescape)
        "k" * 40 + "\x00",
        "k" * 40 + "=k",
    ],
    ids=["inner-space", "non-ascii", "undecodable-byte", "nul", "padding-not-at-end"],
)
def test_admin_token_outside_the_rfc_6750_bearer_syntax_is_refused_without_printing_it(
    token: str,
) -> None:
    with pytest.raises(ConfigError, match="RFC 6750") as caught:
        load({"AUTHZ_ADMIN_TOKEN": token})
    message = str(caught.value)
    assert "AUTHZ_ADMIN_TOKEN=<redacted>" in message
    assert "k" * 20 not in message


@pytest.mark.parametrize(
    "token",
    ["k" * 32, ADMIN_TOKEN, "aZ09-._~+/" * 4 + "==", "  " + "k" * 32 + "\n"],
    ids=["32-chars", "longer", "every-b64token-char", "surrounding-whitespace-stripped"],
)
def test_admin_token_of_32_characters_or_more_is_accepted(token: str) -> None:
    settings = load({"AUTHZ_ADMIN_TOKEN": token})
    assert settings.admin_token is not None
    assert settings.admin_token.reveal() == token.strip()


def test_admin_token_masked_in_environment_errors() -> None:
    with pytest.raises(ConfigError) as caught:
        load({"AUTHZ_ADMIN_TOKEN": ADMIN_TOKEN, "AUTHZ_MODE": "bypass"})
    assert ADMIN_TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", None),
        ("   ", None),
        ("/var/lib/authz/audit.db", Path("/var/lib/authz/audit.db")),
        ("relative.db", Path("relative.db")),
    ],
    ids=["empty-disables", "blank-disables", "absolute", "relative"],
)
def test_audit_db(value: str, expected: Path | None) -> None:
    assert load({"AUTHZ_AUDIT_DB": value}).audit_db == expected


def test_audit_db_default_is_enabled() -> None:
    assert load({}).audit_db == Path("authz-audit.db")


@pytest.mark.parametrize(
    "url",
    [REDIS_URL, "rediss://redis.internal:6380/1", "unix:///run/redis/redis.sock"],
    ids=["redis", "rediss", "unix"],
)
def test_redis_url_is_a_masked_secret(url: str) -> None:
    settings = load({"AUTHZ_REDIS_URL": url, "AUTHZ_RATE_LIMIT_BACKEND": "redis"})
    assert settings.rate_limit_backend == "redis"
    assert isinstance(settings.redis_url, Secret)
    assert settings.redis_url.reveal() == url
    assert url not in repr(settings)
    assert REDIS_PASSWORD not in repr(settings)


@pytest.mark.parametrize(
    "url",
    [
        f"http://:{REDIS_PASSWORD}@redis.internal:6379/0",
        f"{REDIS_PASSWORD}@redis.internal:6379",
        f"tcp://:{REDIS_PASSWORD}@redis.internal",
    ],
    ids=["http", "no-scheme", "tcp"],
)
def test_redis_url_scheme_checked_and_masked(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({"AUTHZ_REDIS_URL": url})
    message = str(caught.value)
    assert "AUTHZ_REDIS_URL" in message
    assert "redis://" in message
    assert REDIS_PASSWORD not in message


def test_redis_url_masked_in_file_errors(tmp_path: Path) -> None:
    path = write(tmp_path, f"redis_url: http://:{REDIS_PASSWORD}@redis.internal:6379/0\n")
    with pytest.raises(ConfigError) as caught:
        load({}, path)
    assert "redis_url" in str(caught.value)
    assert REDIS_PASSWORD not in str(caught.value)


def test_redis_url_masked_in_other_errors() -> None:
    with pytest.raises(ConfigError) as caught:
        load({"AUTHZ_REDIS_URL": REDIS_URL, "AUTHZ_LOG_LEVEL": "loud"})
    assert REDIS_PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    "environ",
    [
        {"AUTHZ_RATE_LIMIT_BACKEND": "redis"},
        {"AUTHZ_RATE_LIMIT_BACKEND": "redis", "AUTHZ_REDIS_URL": ""},
        {"AUTHZ_RATE_LIMIT_BACKEND": "REDIS", "AUTHZ_REDIS_URL": "  "},
    ],
    ids=["unset", "empty", "blank-uppercase-backend"],
)
def test_redis_backend_requires_redis_url(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load(environ)
    assert "AUTHZ_RATE_LIMIT_BACKEND" in str(caught.value)
    assert "AUTHZ_REDIS_URL" in str(caught.value)


def test_memory_backend_needs_no_redis_url() -> None:
    settings = load({"AUTHZ_RATE_LIMIT_BACKEND": "memory"})
    assert (settings.rate_limit_backend, settings.redis_url) == ("memory", None)


# --- key_expiry_warning_days ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("14", 14.0), ("0", 0.0), ("0.5", 0.5), (" 30 ", 30.0), ("365", 365.0)],
    ids=["14", "zero-turns-it-off", "fraction", "spaces", "a-year"],
)
def test_key_expiry_warning_days(value: str, expected: float) -> None:
    settings = load({"AUTHZ_KEY_EXPIRY_WARNING_DAYS": value})
    assert settings.key_expiry_warning_days == expected


def test_key_expiry_warning_days_default_and_file(tmp_path: Path) -> None:
    assert load({}).key_expiry_warning_days == 14.0
    path = write(tmp_path, "key_expiry_warning_days: 7\n")
    assert load({}, path).key_expiry_warning_days == 7.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("-1", "non-negative number of days"),
        ("inf", "non-negative number of days"),
        ("nan", "non-negative number of days"),
        ("two weeks", "expected a number of days"),
        ("", "expected a number of days"),
    ],
    ids=["negative", "infinite", "nan", "words", "empty"],
)
def test_bad_key_expiry_warning_days_names_key_and_value(value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({"AUTHZ_KEY_EXPIRY_WARNING_DAYS": value})
    assert str(caught.value).startswith(f"AUTHZ_KEY_EXPIRY_WARNING_DAYS={value!r}: ")
    assert expected in str(caught.value)


def test_bad_key_expiry_warning_days_in_file_names_file_and_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"authz\.yaml:key_expiry_warning_days=True"):
        load({}, write(tmp_path, "key_expiry_warning_days: true\n"))


def test_decision_cache_defaults_rest_on_the_revision_probe() -> None:
    settings = load({})
    # Entries are dropped on a new revision, which the probe sees within a second; the
    # confirmation window outlasts several probes.
    assert settings.bundle_poll_interval_s == 1.0
    assert settings.decision_cache_confirm_s == 5.0
    assert settings.decision_cache_ttl_s == 60.0
    assert load({"AUTHZ_DECISION_CACHE_CONFIRM_S": "2.5"}).decision_cache_confirm_s == 2.5


@pytest.mark.parametrize(
    "environ",
    [
        {"AUTHZ_DECISION_CACHE_CONFIRM_S": "1"},
        {"AUTHZ_DECISION_CACHE_CONFIRM_S": "3", "AUTHZ_BUNDLE_POLL_INTERVAL_S": "10"},
    ],
    ids=["equal", "shorter"],
)
def test_confirm_window_must_outlast_the_probe_interval(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load(environ)
    message = str(caught.value)
    assert (
        f"AUTHZ_DECISION_CACHE_CONFIRM_S={float(environ['AUTHZ_DECISION_CACHE_CONFIRM_S']):g}"
        in message
    )
    assert "AUTHZ_BUNDLE_POLL_INTERVAL_S" in message


def test_confirm_window_is_free_when_the_cache_is_off() -> None:
    settings = load({"AUTHZ_DECISION_CACHE_TTL_S": "0", "AUTHZ_DECISION_CACHE_CONFIRM_S": "1"})
    assert settings.decision_cache_confirm_s == 1.0


# ----------------------------------------------------------------------------------------
# Transport rules: no credential in clear on a hop.
#
# The gRPC listener is mTLS (certificate, key and client CA together) or bound to loopback;
# OPA is reached over https, loopback or a unix socket; each unless explicitly allowed.
# Every refusal names the key and the value.


TLS = {
    "AUTHZ_GRPC_TLS_CERT": "/run/authz/tls/tls.crt",
    "AUTHZ_GRPC_TLS_KEY": "/run/authz/tls/tls.key",
    "AUTHZ_GRPC_TLS_CLIENT_CA": "/run/authz/tls/ca.crt",
}


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("[::1]", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("[::]", False),
        ("10.0.0.5", False),
        ("authz", False),
        ("localhost.example.com", False),
        ("", False),
    ],
    ids=lambda value: str(value) or "empty",
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize(
    "addr",
    ["0.0.0.0:9191", "[::]:9191", "10.0.0.5:9191", "authz:9191"],
    ids=["any-v4", "any-v6", "private-ip", "dns-name"],
)
def test_plaintext_grpc_on_a_non_loopback_address_is_refused(addr: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({"AUTHZ_GRPC_ADDR": addr})
    message = str(caught.value)
    assert f"AUTHZ_GRPC_ADDR={addr!r}" in message
    assert "AUTHZ_GRPC_TLS_CERT" in message
    assert "AUTHZ_GRPC_ALLOW_PLAINTEXT=true" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "environ",
    [
        {"AUTHZ_GRPC_ADDR": "127.0.0.1:9191"},
        {"AUTHZ_GRPC_ADDR": "localhost:9191"},
        {"AUTHZ_GRPC_ADDR": "[::1]:9191"},
        {"AUTHZ_GRPC_ADDR": "0.0.0.0:9191", **TLS},
        {"AUTHZ_GRPC_ADDR": "0.0.0.0:9191", "AUTHZ_GRPC_ALLOW_PLAINTEXT": "true"},
    ],
    ids=["loopback-v4", "localhost", "loopback-v6", "any-with-mtls", "any-explicitly-plaintext"],
)
def test_grpc_listener_accepted_when_loopback_mtls_or_explicit(environ: dict[str, str]) -> None:
    settings = load(environ)
    assert settings.grpc_addr == environ["AUTHZ_GRPC_ADDR"]


def test_mtls_settings_are_paths() -> None:
    settings = load({"AUTHZ_GRPC_ADDR": "0.0.0.0:9191", **TLS})
    assert settings.grpc_tls is True
    assert settings.grpc_tls_cert == Path("/run/authz/tls/tls.crt")
    assert settings.grpc_tls_key == Path("/run/authz/tls/tls.key")
    assert settings.grpc_tls_client_ca == Path("/run/authz/tls/ca.crt")
    assert load({}).grpc_tls is False


@pytest.mark.parametrize("missing", sorted(TLS), ids=sorted(TLS))
def test_mtls_needs_certificate_key_and_client_ca_together(missing: str) -> None:
    environ = {key: value for key, value in TLS.items() if key != missing}
    with pytest.raises(ConfigError) as caught:
        load(environ)
    message = str(caught.value)
    assert f"{missing} not set" in message
    for key, value in environ.items():
        assert f"{key}={value!r}" in message


def test_mtls_setting_from_the_file(tmp_path: Path) -> None:
    config = tmp_path / "authz.yaml"
    config.write_text(
        "grpc_addr: 0.0.0.0:9191\n"
        "grpc_tls_cert: /tls/tls.crt\n"
        "grpc_tls_key: /tls/tls.key\n"
        "grpc_tls_client_ca: /tls/ca.crt\n",
        encoding="utf-8",
    )
    assert load({}, config).grpc_tls is True


def test_allow_plaintext_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match=r"AUTHZ_GRPC_ALLOW_PLAINTEXT='sure': expected"):
        load({"AUTHZ_GRPC_ALLOW_PLAINTEXT": "sure"})


@pytest.mark.parametrize(
    "url",
    ["http://opa:8181", "http://10.0.0.7:8181", "http://0.0.0.0:8181", "http://opa.internal"],
    ids=["service-name", "private-ip", "any", "no-port"],
)
def test_plaintext_opa_url_to_a_non_loopback_host_is_refused(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({"AUTHZ_OPA_URL": url})
    message = str(caught.value)
    assert f"AUTHZ_OPA_URL={url!r}" in message
    assert "AUTHZ_OPA_ALLOW_PLAINTEXT=true" in message


@pytest.mark.parametrize(
    "environ",
    [
        {"AUTHZ_OPA_URL": "http://127.0.0.1:8181"},
        {"AUTHZ_OPA_URL": "http://localhost:8181"},
        {"AUTHZ_OPA_URL": "http://[::1]:8181"},
        {"AUTHZ_OPA_URL": "https://opa:8181"},
        {"AUTHZ_OPA_URL": "unix:///run/opa/opa.sock"},
        {"AUTHZ_OPA_URL": "http://opa:8181", "AUTHZ_OPA_ALLOW_PLAINTEXT": "true"},
    ],
    ids=["loopback", "localhost", "loopback-v6", "https", "unix-socket", "explicit"],
)
def test_opa_url_accepted_when_loopback_tls_socket_or_explicit(environ: dict[str, str]) -> None:
    assert load(environ).opa_url == environ["AUTHZ_OPA_URL"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "No such file"), (b"not a descriptor set \xff", "not a usable descriptor set")],
    ids=["missing", "not-a-descriptor-set"],
)
def test_proto_descriptor_that_cannot_be_used_fails_startup_naming_key_and_file(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    from authz.runtime.server import build_authorizer
    from tests.helpers.fakes import FakeEngine

    path = tmp_path / "api.pb"
    if content is not None:
        path.write_bytes(content)
    settings = load({"AUTHZ_PROTO_DESCRIPTOR": str(path)})
    with pytest.raises(ConfigError) as caught:
        build_authorizer(settings, FakeEngine({"allowed": True}), sinks=())
    assert f"AUTHZ_PROTO_DESCRIPTOR={str(path)!r}" in str(caught.value)
    assert expected in str(caught.value)


# -- Secrets from files: AUTHZ_<KEY>_FILE (Docker and Kubernetes secrets) ----------------

ADMIN_TOKEN = "adm1n-" + "x" * 40
REDIS_URL = "redis://:hunter2-redis-password@redis:6379/0"
SECRET_FILE_CASES = [
    ("AUTHZ_ADMIN_TOKEN", "admin_token", ADMIN_TOKEN),
    ("AUTHZ_OPA_TOKEN", "opa_token", TOKEN),
    ("AUTHZ_REDIS_URL", "redis_url", REDIS_URL),
]


@pytest.mark.parametrize(
    ("variable", "attribute", "value"), SECRET_FILE_CASES, ids=[c[1] for c in SECRET_FILE_CASES]
)
def test_secret_file_variant_reads_the_value_without_its_newline(
    tmp_path: Path, variable: str, attribute: str, value: str
) -> None:
    path = write(tmp_path, value + "\n", name="secret")
    settings = load({f"{variable}_FILE": str(path)})
    secret = getattr(settings, attribute)
    assert isinstance(secret, Secret)
    assert secret.reveal() == value
    assert value not in repr(settings)


@pytest.mark.parametrize(
    ("variable", "attribute", "value"), SECRET_FILE_CASES, ids=[c[1] for c in SECRET_FILE_CASES]
)
def test_secret_variable_and_its_file_together_are_refused(
    tmp_path: Path, variable: str, attribute: str, value: str
) -> None:
    path = write(tmp_path, value, name="secret")
    with pytest.raises(ConfigError) as caught:
        load({variable: value, f"{variable}_FILE": str(path)})
    message = str(caught.value)
    assert variable in message
    assert f"{variable}_FILE" in message
    assert value not in message


def test_empty_secret_variable_beside_its_file_counts_as_unset(tmp_path: Path) -> None:
    """Compose's `AUTHZ_REDIS_URL: ${AUTHZ_REDIS_URL:-}` passes an empty variable."""
    path = write(tmp_path, REDIS_URL, name="secret")
    settings = load({"AUTHZ_REDIS_URL": "", "AUTHZ_REDIS_URL_FILE": str(path)})
    assert settings.redis_url == Secret(REDIS_URL)


@pytest.mark.parametrize(
    ("variable", "content", "expected"),
    [
        ("AUTHZ_ADMIN_TOKEN", "short-" + "s3cr3t", "at least 32 characters"),
        ("AUTHZ_REDIS_URL", "http://:pw-s3cr3t@redis:6379", "redis://"),
        ("AUTHZ_OPA_TOKEN", "", "is empty"),
        ("AUTHZ_OPA_TOKEN", "x" * (64 * 1024 + 1), "larger than"),
    ],
    ids=["short-admin-token", "redis-url-scheme", "empty-file", "oversized-file"],
)
def test_secret_file_errors_name_the_key_and_the_file_never_the_value(
    tmp_path: Path, variable: str, content: str, expected: str
) -> None:
    path = write(tmp_path, content, name="secret")
    with pytest.raises(ConfigError) as caught:
        load({f"{variable}_FILE": str(path)})
    message = str(caught.value)
    assert f"{variable}_FILE={str(path)!r}" in message
    assert expected in message
    if content:
        assert content not in message
        assert "s3cr3t" not in message


def test_unreadable_secret_file_names_the_key_and_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(ConfigError) as caught:
        load({"AUTHZ_ADMIN_TOKEN_FILE": str(missing)})
    assert f"AUTHZ_ADMIN_TOKEN_FILE={str(missing)!r}" in str(caught.value)


# -- Unknown AUTHZ_* variables -----------------------------------------------------------

TYPOS = [
    ("AUTHZ_ALLOW_BYPAS", "AUTHZ_ALLOW_BYPASS"),
    ("AUTHZ_REDIS_FAILURE", "AUTHZ_REDIS_FAILURE_MODE"),
    ("AUTHZ_GRPC_TLS_CLIENTCA", "AUTHZ_GRPC_TLS_CLIENT_CA"),
    ("AUTHZ_FAIL_OPEN_PATH", "AUTHZ_FAIL_OPEN_PATHS"),
    ("AUTHZ_ADMIN_TOKEN_FIEL", "AUTHZ_ADMIN_TOKEN_FILE"),
    ("AUTHZ_ADMIN_TOKN", "AUTHZ_ADMIN_TOKEN"),
]


@pytest.mark.parametrize(("typo", "meant"), TYPOS, ids=[t[0] for t in TYPOS])
def test_unknown_variable_resembling_a_setting_is_refused(typo: str, meant: str) -> None:
    """A typo'd setting is never silently ignored: the variable, and what it resembles,
    are named; its value is not (it may be a token)."""
    value = "deny-" + "v4lue" * 8
    with pytest.raises(ConfigError) as caught:
        load({typo: value})
    message = str(caught.value)
    assert typo in message
    assert meant in message
    assert value not in message


def test_unrelated_unknown_variables_are_reported_not_refused() -> None:
    """Tool variables and Kubernetes service links share the prefix: one warning, no exit."""
    environ = {
        "AUTHZ_OPA_BIN": "/usr/bin/opa",
        "AUTHZ_METRICS_SERVICE_HOST": "10.0.0.7",
        "AUTHZ_LOG_LEVEL": "INFO",
        "AUTHZ_ADMIN_TOKEN_FILE": "/dev/null",
        "OTHER": "x",
    }
    load({k: v for k, v in environ.items() if k != "AUTHZ_ADMIN_TOKEN_FILE"})
    assert unknown_variables(environ) == ["AUTHZ_METRICS_SERVICE_HOST", "AUTHZ_OPA_BIN"]


def test_no_unknown_variables_in_a_clean_environment() -> None:
    assert unknown_variables({"AUTHZ_MODE": "enforce", "AUTHZ_REDIS_URL_FILE": "/x"}) == []


# AUTHZ_* variables that are not settings: the project's scripts and tests, Compose
# interpolation, Kubernetes service links of the Service "authz-metrics".
NOT_SETTINGS = [
    "AUTHZ_OPA_BIN",
    "AUTHZ_ENVOY_BIN",
    "AUTHZ_PEER_BIN",
    "AUTHZ_PROMTOOL_BIN",
    "AUTHZ_COMPOSECHECK_BIN",
    "AUTHZ_VENV",
    "AUTHZ_CACHE",
    "AUTHZ_TIMEOUT",
    "AUTHZ_E2E_CONTAINERS",
    "AUTHZ_SECRETS_DIR",
    "AUTHZ_BUNDLE_DIR",
    "AUTHZ_BUNDLE_PUBLIC_KEY",
    "AUTHZ_CLIENT_TLS_DIR",
    "AUTHZ_GATEWAY_TLS_NAME",
    "AUTHZ_EGRESS_TLS_NAME",
    "AUTHZ_GATEWAY_BIND",
    "AUTHZ_EGRESS_BIND",
    "AUTHZ_METRICS_SERVICE_HOST",
    "AUTHZ_METRICS_SERVICE_PORT",
    "AUTHZ_METRICS_SERVICE_PORT_ADMIN",
    "AUTHZ_METRICS_PORT",
    "AUTHZ_METRICS_PORT_9192_TCP_ADDR",
]


def test_the_projects_other_authz_variables_are_not_taken_for_typos() -> None:
    environ = dict.fromkeys(NOT_SETTINGS, "1")
    load(environ)
    assert unknown_variables(environ) == sorted(NOT_SETTINGS)


# -- Decision-log upload (issue #17) ------------------------------------------------------

UPLOAD_TOKEN = "dl-upload-" + "y" * 30
UPLOAD_URL = "https://logs.example.com/v1"


def test_decision_log_upload_settings_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, UPLOAD_TOKEN + "\n", name="token")
    settings = load(
        {
            "AUTHZ_DECISION_LOG_SERVICE_URL": UPLOAD_URL + "/",
            "AUTHZ_DECISION_LOG_SERVICE_TOKEN_FILE": str(path),
            "AUTHZ_DECISION_LOG_MIN_DELAY_S": "2",
            "AUTHZ_DECISION_LOG_MAX_DELAY_S": "30",
            "AUTHZ_DECISION_LOG_UPLOAD_SIZE_LIMIT_BYTES": "65536",
            "AUTHZ_DECISION_LOG_BUFFER_SIZE_LIMIT_BYTES": "1048576",
            "AUTHZ_DECISION_LOG_DROP_ALLOWED": "true",
            "AUTHZ_DECISION_LOG_DROP_PATHS": "authz/health/decision",
        }
    )
    assert settings.decision_log_service_url == UPLOAD_URL
    assert settings.decision_log_service_token == Secret(UPLOAD_TOKEN)
    assert UPLOAD_TOKEN not in repr(settings)
    assert (settings.decision_log_min_delay_s, settings.decision_log_max_delay_s) == (2.0, 30.0)
    assert settings.decision_log_upload_size_limit_bytes == 65536
    assert settings.decision_log_buffer_size_limit_bytes == 1048576
    assert settings.decision_log_drop_allowed is True
    assert settings.decision_log_drop_paths == ("authz/health/decision",)


def test_decision_log_upload_is_off_by_default() -> None:
    assert load({}).decision_log_service_url is None


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        (
            {"AUTHZ_DECISION_LOG_SERVICE_URL": "http://logs.example.com"},
            ["AUTHZ_DECISION_LOG_SERVICE_URL", "'http://logs.example.com'", "https"],
        ),
        (
            {"AUTHZ_DECISION_LOG_SERVICE_URL": "ftp://logs.example.com"},
            ["AUTHZ_DECISION_LOG_SERVICE_URL", "'ftp://logs.example.com'"],
        ),
        (
            {"AUTHZ_DECISION_LOG_SERVICE_URL": "https://logs.example.com?x=1"},
            ["AUTHZ_DECISION_LOG_SERVICE_URL", "'https://logs.example.com?x=1'"],
        ),
        (
            {"AUTHZ_DECISION_LOG_MIN_DELAY_S": "90", "AUTHZ_DECISION_LOG_MAX_DELAY_S": "60"},
            ["AUTHZ_DECISION_LOG_MIN_DELAY_S=90.0", "AUTHZ_DECISION_LOG_MAX_DELAY_S=60.0"],
        ),
        (
            {
                "AUTHZ_DECISION_LOG_UPLOAD_SIZE_LIMIT_BYTES": "65536",
                "AUTHZ_DECISION_LOG_BUFFER_SIZE_LIMIT_BYTES": "4096",
            },
            ["AUTHZ_DECISION_LOG_UPLOAD_SIZE_LIMIT_BYTES=65536", "BUFFER_SIZE_LIMIT_BYTES=4096"],
        ),
        (
            {"AUTHZ_DECISION_LOG_BUFFER_SIZE_LIMIT_BYTES": "10"},
            ["AUTHZ_DECISION_LOG_BUFFER_SIZE_LIMIT_BYTES", "'10'"],
        ),
        (
            {"AUTHZ_DECISION_LOG_DROP_PATHS": "not a path!"},
            ["AUTHZ_DECISION_LOG_DROP_PATHS"],
        ),
    ],
    ids=[
        "plaintext-off-loopback",
        "not-http",
        "query",
        "min-over-max",
        "batch-over-buffer",
        "buffer-too-small",
        "bad-drop-path",
    ],
)
def test_decision_log_upload_bad_setting_names_key_and_value(
    environ: dict[str, str], names: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(environ)
    for name in names:
        assert name in str(caught.value)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080", "http://localhost", "http://[::1]:9000", UPLOAD_URL]
)
def test_decision_log_service_url_plaintext_only_on_loopback(url: str) -> None:
    assert load({"AUTHZ_DECISION_LOG_SERVICE_URL": url}).decision_log_service_url == url


@pytest.mark.parametrize(
    "environ",
    [
        {"AUTHZ_DECISION_LOG_SERVICE_TOKEN": UPLOAD_TOKEN},
        {
            "AUTHZ_DECISION_LOG_SERVICE_URL": UPLOAD_URL,
            "AUTHZ_DECISION_LOG_SERVICE_TOKEN": UPLOAD_TOKEN + " \x00bad",
        },
        {"AUTHZ_DECISION_LOG_SERVICE_URL": f"https://user:{UPLOAD_TOKEN}@logs.example.com"},
    ],
    ids=["token-without-url", "token-not-bearer-syntax", "credentials-in-url"],
)
def test_decision_log_service_token_never_in_an_error(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load(environ)
    assert "AUTHZ_DECISION_LOG_SERVICE" in str(caught.value)
    assert UPLOAD_TOKEN not in str(caught.value)


# -- Fleet audit store (issue #16): AUTHZ_AUDIT_URL(_FILE), AUTHZ_REPLICA_ID -------------

AUDIT_PASSWORD = "pg-Secret-7"
AUDIT_URL = f"postgresql://authz:{AUDIT_PASSWORD}@127.0.0.1:5432/authz"


@pytest.mark.parametrize(
    "url",
    [
        AUDIT_URL,
        f"postgres://authz:{AUDIT_PASSWORD}@localhost/authz",
        f"postgresql://authz:{AUDIT_PASSWORD}@db.internal:5432/authz?sslmode=verify-full",
        f"postgresql://authz:{AUDIT_PASSWORD}@db.internal/authz?sslmode=require",
        f"postgresql:///authz?host=/run/postgresql&password={AUDIT_PASSWORD}",
    ],
    ids=["loopback", "postgres-scheme", "tls-verify-full", "tls-require", "unix-socket"],
)
def test_audit_url_is_a_masked_secret(url: str, tmp_path: Path) -> None:
    settings = load({"AUTHZ_AUDIT_URL": url})
    assert isinstance(settings.audit_url, Secret)
    assert settings.audit_url.reveal() == url
    assert AUDIT_PASSWORD not in repr(settings) + str(settings)
    # The _FILE variant (a Docker/Kubernetes secret) reads the same value.
    path = tmp_path / "audit-url"
    path.write_text(url + "\n")
    from_file = load({"AUTHZ_AUDIT_URL_FILE": str(path)}).audit_url
    assert from_file is not None
    assert from_file.reveal() == url


@pytest.mark.parametrize(
    "url",
    [
        f"mysql://authz:{AUDIT_PASSWORD}@127.0.0.1/authz",
        f"postgresql://authz:{AUDIT_PASSWORD}@127.0.0.1:port/authz",
        f"postgresql:///authz?password={AUDIT_PASSWORD}",
        f"postgresql:///authz?host=db.internal&password={AUDIT_PASSWORD}",
        f"postgresql://authz:{AUDIT_PASSWORD}@db.internal/authz",
        f"postgresql://authz:{AUDIT_PASSWORD}@db.internal/authz?sslmode=prefer",
    ],
    ids=[
        "not-postgres",
        "bad-port",
        "no-host",
        "plaintext-remote-host-parameter",
        "plaintext-remote",
        "downgradable-tls",
    ],
)
def test_bad_audit_url_is_refused_without_quoting_it(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({"AUTHZ_AUDIT_URL": url})
    assert "AUTHZ_AUDIT_URL" in str(caught.value)
    assert AUDIT_PASSWORD not in str(caught.value)


def test_plaintext_remote_audit_database_only_when_allowed() -> None:
    url = f"postgresql://authz:{AUDIT_PASSWORD}@db.internal/authz"
    settings = load({"AUTHZ_AUDIT_URL": url, "AUTHZ_AUDIT_ALLOW_PLAINTEXT": "true"})
    assert settings.audit_url is not None


def test_audit_url_and_its_file_are_not_both_set(tmp_path: Path) -> None:
    path = tmp_path / "audit-url"
    path.write_text(AUDIT_URL)
    with pytest.raises(ConfigError) as caught:
        load({"AUTHZ_AUDIT_URL": AUDIT_URL, "AUTHZ_AUDIT_URL_FILE": str(path)})
    assert "AUTHZ_AUDIT_URL" in str(caught.value)
    assert AUDIT_PASSWORD not in str(caught.value)


def test_replica_id_defaults_to_the_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "authz-7d9f-abcde")
    assert load({}).replica_id == "authz-7d9f-abcde"
    assert load({"AUTHZ_REPLICA_ID": "replica-b"}).replica_id == "replica-b"


@pytest.mark.parametrize(
    "value",
    ["", "-leading-dash", "has space", "a/b", "x" * 129, "nul\x00"],
    ids=["empty", "leading-dash", "space", "slash", "too-long", "nul"],
)
def test_bad_replica_id_is_refused_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({"AUTHZ_REPLICA_ID": value})
    assert "AUTHZ_REPLICA_ID" in str(caught.value)


def test_a_host_name_that_is_no_replica_id_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "bad host")
    with pytest.raises(ConfigError) as caught:
        load({})
    assert "AUTHZ_REPLICA_ID" in str(caught.value)
    assert "host name" in str(caught.value)


# -- egress tunnels (issue 18): the test-only static targets ------------------------------


def test_tunnel_test_targets_are_empty_by_default_and_parse_pairs() -> None:
    assert load({}).egress_tunnel_test_targets == ()
    value = "allowed.test:443=127.0.0.1:4000, v6.test:8443=[::1]:1"
    settings = load({"AUTHZ_EGRESS_TUNNEL_TEST_TARGETS": value})
    assert settings.egress_tunnel_test_targets == (
        ("allowed.test:443", "127.0.0.1:4000"),
        ("v6.test:8443", "[::1]:1"),
    )


@pytest.mark.parametrize(
    "value",
    [
        "allowed.test=127.0.0.1:4000",
        "Allowed.test:443=127.0.0.1:4000",
        "allowed.test:0=127.0.0.1:4000",
        "allowed.test:443=localhost:4000",
        "allowed.test:443=127.0.0.1",
        "allowed.test:443=127.0.0.1:70000",
    ],
    ids=["no-port", "uppercase", "port-0", "not-ip", "no-target-port", "target-port-range"],
)
def test_bad_tunnel_test_targets_name_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match="AUTHZ_EGRESS_TUNNEL_TEST_TARGETS"):
        load({"AUTHZ_EGRESS_TUNNEL_TEST_TARGETS": value})
