"""authz.core.secret.Secret: the value prints masked everywhere; only reveal() gives it."""

from __future__ import annotations

import logging

import pytest

from authz.core.secret import MASK, Secret

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
