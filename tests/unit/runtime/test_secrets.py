"""authz.runtime.secrets.Secret: the value prints masked everywhere; only reveal() gives it."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from authz.core.errors import ConfigError, CredentialError
from authz.runtime.secrets import (
    MASK,
    Secret,
    SecretStore,
    collect_credentials,
    env_name,
    write_secrets_file,
)

VALUE = "opa-t0ken-5f4e3d2c1b0a"


@pytest.mark.parametrize(
    "render",
    [
        repr,
        str,
        lambda s: f"{s}",
        lambda s: f"{s!r}",
        lambda s: "%s %r" % (s, s),  # noqa: UP031 - %-formatting is what logging uses
        lambda s: "{}".format(s),  # noqa: UP032
        lambda s: repr([s, {"token": s}]),
        lambda s: str(ValueError(s)),
    ],
    ids=["repr", "str", "f-string", "f-string-repr", "percent", "format", "container", "exception"],
)
def test_value_never_printed(render: object) -> None:
    text = render(Secret(VALUE))  # type: ignore[operator]
    assert VALUE not in text
    assert MASK in text


def test_mask_and_repr_shape() -> None:
    assert MASK == "**********"
    assert repr(Secret(VALUE)) == "Secret('**********')"
    assert str(Secret(VALUE)) == "**********"


def test_log_record_is_masked(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="test.secrets"):
        logging.getLogger("test.secrets").info("token=%s settings=%r", Secret(VALUE), Secret(VALUE))
    assert VALUE not in caplog.text
    assert MASK in caplog.text


def test_reveal_returns_the_value() -> None:
    assert Secret(VALUE).reveal() == VALUE


@pytest.mark.parametrize(
    ("left", "right", "equal"),
    [
        (Secret(VALUE), Secret(VALUE), True),
        (Secret(VALUE), Secret(VALUE + "x"), False),
        (Secret(""), Secret(""), True),
        (Secret(VALUE), VALUE, False),
        (Secret(VALUE), MASK, False),
        (Secret(VALUE), None, False),
    ],
    ids=["same", "different", "empty", "vs-plain-string", "vs-mask", "vs-none"],
)
def test_equality(left: Secret, right: object, equal: bool) -> None:
    assert (left == right) is equal
    assert (left != right) is (not equal)
    if isinstance(right, Secret) and equal:
        assert hash(left) == hash(right)


def test_usable_in_sets() -> None:
    assert len({Secret(VALUE), Secret(VALUE), Secret("other")}) == 2


@pytest.mark.parametrize(("value", "truthy"), [(VALUE, True), ("", False)], ids=["set", "empty"])
def test_truthiness(value: str, truthy: bool) -> None:
    assert bool(Secret(value)) is truthy


def test_no_attribute_dict_to_leak_through() -> None:
    secret = Secret(VALUE)
    assert not hasattr(secret, "__dict__")
    with pytest.raises(AttributeError):
        secret.extra = 1  # type: ignore[attr-defined]


# -- the secrets file ----------------------------------------------------------------

CRED = "cred-value-1234567890"


def write(path: Path, document: Any) -> None:
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    path.chmod(0o600)


def bump(path: Path, document: Any) -> None:
    """Rewrite ``path`` so that its signature changes even within one mtime tick."""
    write(path, document)
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))


def good(**credentials: str) -> dict[str, Any]:
    return {"version": 1, "credentials": credentials}


def test_open_and_get(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    write(path, good(openai=CRED))
    store = SecretStore.open(path)
    assert store.get("openai").reveal() == CRED
    assert store.loaded
    assert store.references == {"openai"}
    with pytest.raises(CredentialError, match="'github' is absent"):
        store.get("github")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "expected a JSON object"),
        ({"credentials": {}}, "version=None"),
        ({"version": 2, "credentials": {}}, "version=2"),
        ({"version": 1}, "'credentials' must be an object"),
        ({"version": 1, "credentials": {"../x": CRED}}, "not a valid reference"),
    ],
    ids=["syntax", "array", "no-version", "version-2", "no-credentials", "bad-ref"],
)
def test_open_malformed_is_a_startup_error(tmp_path: Path, document: Any, message: str) -> None:
    path = tmp_path / "s.json"
    if isinstance(document, str):
        path.write_text(document)
    else:
        write(path, document)
    with pytest.raises(ConfigError, match=message) as failed:
        SecretStore.open(path)
    assert str(path) in str(failed.value)


def test_open_missing_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        SecretStore.open(tmp_path / "absent.json")


def test_syntax_error_message_never_quotes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text('{"version": 1, "credentials": {"openai": "' + CRED + '" "x"}}')
    with pytest.raises(ConfigError) as failed:
        SecretStore.open(path)
    assert CRED not in str(failed.value)


@pytest.mark.parametrize(
    "value", [5, "", None, ["a"], "a\nb"], ids=["number", "empty", "null", "list", "newline"]
)
def test_malformed_entry_only_breaks_its_reference(tmp_path: Path, value: Any) -> None:
    path = tmp_path / "s.json"
    write(path, {"version": 1, "credentials": {"openai": CRED, "slack": value}})
    store = SecretStore.open(path)
    assert store.get("openai").reveal() == CRED
    with pytest.raises(CredentialError, match="'slack' is malformed"):
        store.get("slack")


@pytest.mark.parametrize(
    ("mode", "warns"),
    [(0o600, False), (0o440, False), (0o640, False), (0o644, True), (0o660, True)],
    ids=["owner-only", "k8s-fsgroup", "group-read", "world-read", "group-write"],
)
def test_permissive_file_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, warns: bool
) -> None:
    path = tmp_path / "s.json"
    write(path, good(openai=CRED))
    path.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="authz.runtime.secrets"):
        SecretStore.open(path)
    assert ("chmod 600" in caplog.text) is warns
    assert CRED not in caplog.text


def test_reload_on_change(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    write(path, good(openai=CRED))
    store = SecretStore.open(path)
    assert store.refresh() is False
    bump(path, good(openai="rotated-value", github="gh-value"))
    assert store.refresh() is True
    assert store.get("openai").reveal() == "rotated-value"
    assert store.get("github").reveal() == "gh-value"
    assert store.reloads == 1


def test_runtime_failure_denies_everything_until_fixed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.json"
    write(path, good(openai=CRED))
    store = SecretStore.open(path)
    bump(path, "{broken")
    with caplog.at_level(logging.ERROR, logger="authz.runtime.secrets"):
        assert store.refresh() is True
    assert not store.loaded
    with pytest.raises(CredentialError, match="missing or malformed"):
        store.get("openai")
    assert store.reload_failures == 1
    # The same broken file is not re-read (and re-logged) every interval.
    assert store.refresh() is False
    bump(path, good(openai="fixed"))
    assert store.refresh() is True
    assert store.get("openai").reveal() == "fixed"
    assert CRED not in caplog.text


def test_file_removed_at_runtime(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    write(path, good(openai=CRED))
    store = SecretStore.open(path)
    path.unlink()
    assert store.refresh() is True
    with pytest.raises(CredentialError):
        store.get("openai")
    assert store.refresh() is False
    write(path, good(openai="back"))
    assert store.refresh() is True
    assert store.get("openai").reveal() == "back"


def test_write_secrets_file_mode_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "s.json"
    write_secrets_file(path, {"openai": CRED, "github": "gh"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store = SecretStore.open(path)
    assert store.get("openai").reveal() == CRED
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]


@pytest.mark.parametrize(
    ("credentials", "message"),
    [({"../x": "v"}, "not a valid secret reference"), ({"openai": ""}, "'openai' is empty")],
    ids=["bad-ref", "empty"],
)
def test_write_secrets_file_rejects(
    tmp_path: Path, credentials: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        write_secrets_file(tmp_path / "s.json", credentials)
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize(
    ("ref", "name"),
    [("openai", "EGRESS_SECRET_OPENAI"), ("my-api.v2", "EGRESS_SECRET_MY_API_V2")],
    ids=["plain", "punctuation"],
)
def test_env_name(ref: str, name: str) -> None:
    assert env_name(ref) == name


def test_collect_credentials() -> None:
    environ = {"EGRESS_SECRET_OPENAI": " v1 ", "EGRESS_SECRET_SLACK": "", "OTHER": "x"}
    found, missing = collect_credentials(["openai", "slack", "github"], environ)
    assert found == {"openai": "v1"}
    assert missing == ["slack", "github"]
