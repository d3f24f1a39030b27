"""Reload (SIGHUP, ``POST /v1/reload``) in :mod:`authz.runtime.server`: every Settings
field is classified (:data:`authz.runtime.config.RELOADABLE` / ``RESTART_ONLY``); each
reloadable field changes what the running components do; each restart-only field is
reported by name and not applied; a bad settings file is refused whole."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any, cast

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from prometheus_client import CollectorRegistry, Counter

from authz.core.authorizer import Authorizer
from authz.core.errors import ConfigError
from authz.core.mode import Control, Mode
from authz.core.ratelimit import Quota, RateLimitResult
from authz.core.secret import Secret
from authz.runtime.config import RELOADABLE, RESTART_ONLY, Settings, load
from authz.runtime.expiry import KeyExpiryWatch
from authz.runtime.fleet import Fleet
from authz.runtime.metrics import Metrics
from authz.runtime.server import (
    LiveSettings,
    _FleetActivation,
    build_authorizer,
    build_fleet,
    reload_settings,
)
from tests.helpers.fakes import FakeEngine, FlakyEngine, check_request

PATH = Settings().default_decision_path
SECRET_VALUE = "s3cret-value-never-printed"


def test_every_settings_field_is_classified_once() -> None:
    names = {f.name for f in dataclasses.fields(Settings)}
    assert set(RELOADABLE) | set(RESTART_ONLY) == names, "classify the new field for reload"
    assert not set(RELOADABLE) & set(RESTART_ONLY)
    assert all(RESTART_ONLY.values()), "every restart-only field says why"


def test_readme_reload_table_lists_every_setting() -> None:
    readme = (Path(__file__).parents[3] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Reload\n", 1)[1].split("\n### ", 1)[0]
    rows = {
        line.split("`")[1]: line.split("|")[2].strip()
        for line in section.splitlines()
        if line.startswith("| `AUTHZ_")
    }
    expected = {f"AUTHZ_{name.upper()}": "applied" for name in RELOADABLE}
    expected |= {f"AUTHZ_{name.upper()}": "restart" for name in RESTART_ONLY}
    assert rows == expected


class _Quotas:
    """A Limiter that allows everything and keeps every quota it was asked about."""

    def __init__(self) -> None:
        self.quotas: list[Quota] = []

    async def check(self, key: str, quota: Quota) -> RateLimitResult:
        self.quotas.append(quota)
        return RateLimitResult(True, quota, quota.burst - 1, 0.0, 0.0, "memory")

    async def close(self) -> None:
        return None


class _Rig:
    """An authorizer, the key-expiry watch and the Control built from ``settings`` as
    the server builds them, with the LiveSettings a reload applies to."""

    def __init__(self, settings: Settings, engine: Any) -> None:
        self.registry = CollectorRegistry()
        counter = Counter("expiring", "test", ["decision_path"], registry=self.registry)
        self.expiry = KeyExpiryWatch(settings.key_expiry_warning_days, counter)
        self.control = Control(settings.mode, allow_bypass=settings.allow_bypass)
        self.limiter = _Quotas()
        self.engine = engine
        self.authorizer: Authorizer = build_authorizer(
            settings, engine, [self.expiry], None, self.limiter, control=self.control
        )
        self.live = LiveSettings(settings, self.control, self.authorizer, self.expiry)
        self.actions: list[tuple[str, dict[str, Any]]] = []

    def reload(self, new: Settings | Callable[[], Settings]) -> dict[str, Any]:
        reader = new if callable(new) else (lambda: new)
        return reload_settings(
            reader, self.live, None, lambda a, f: self.actions.append((a, dict(f))), actor="t"
        )

    async def status(self) -> int:
        response: external_auth_pb2.CheckResponse = (
            await self.authorizer.check(check_request())
        ).response
        if response.HasField("ok_response"):
            return 200
        return int(response.denied_response.status.code)

    def expiring(self) -> float:
        value = self.registry.get_sample_value("expiring_total", {"decision_path": PATH})
        return value or 0.0


def _expiring_in(days: float) -> dict[str, Any]:
    expires = (datetime.now(UTC) + timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")
    identity = {"key_id": "k1", "expires_at": expires}
    rate_limit = {"tier": "t", "key": "key:k1", "requests_per_minute": 60}
    return {
        "allowed": True,
        "authz": {"reason": "allowed", "identity": identity, "rate_limit": rate_limit},
    }


ALLOW_EXPIRING = _expiring_in(5)


# Each reloadable field: (the new value, a probe of the running behaviour that returns
# something comparable before and after, the engine). The probe must differ.
Probe = Callable[[_Rig], Awaitable[object]]


async def _mode(rig: _Rig) -> object:
    return rig.control.mode


async def _log_level(rig: _Rig) -> object:
    return logging.getLogger().level


async def _timeout_passed_to_opa(rig: _Rig) -> object:
    await rig.authorizer.check(check_request())
    return rig.engine.calls[-1][2] > 1.0  # 300 ms budget before, 2 s after


async def _burst(rig: _Rig) -> object:
    await rig.authorizer.check(check_request())
    return rig.limiter.quotas[-1].burst


async def _fail_open_status(rig: _Rig) -> object:
    return await rig.status()


async def _fail_open_cap(rig: _Rig) -> object:
    return [await rig.status() for _ in range(3)] == [200, 200, 200]


async def _expiry_counted(rig: _Rig) -> object:
    before = rig.expiring()
    await rig.authorizer.check(check_request())
    return rig.expiring() > before


BASE_FAIL_OPEN = Settings(fail_open_paths=(PATH,), fail_open_max_per_s=1)
RELOAD_CASES: dict[str, tuple[Settings, object, Probe, Callable[[], Any]]] = {
    "mode": (Settings(), Mode.DRY_RUN, _mode, lambda: FakeEngine(True)),
    "log_level": (Settings(), "ERROR", _log_level, lambda: FakeEngine(True)),
    "decision_timeout_ms": (Settings(), 2000, _timeout_passed_to_opa, lambda: FakeEngine(True)),
    "rate_limit_burst_s": (Settings(), 30.0, _burst, lambda: FakeEngine(ALLOW_EXPIRING)),
    "fail_open_paths": (Settings(), (PATH,), _fail_open_status, FlakyEngine),
    "fail_open_max_per_s": (BASE_FAIL_OPEN, 100, _fail_open_cap, FlakyEngine),
    "key_expiry_warning_days": (
        Settings(key_expiry_warning_days=1),
        10.0,
        _expiry_counted,
        lambda: FakeEngine(ALLOW_EXPIRING),
    ),
}


def test_reload_matrix_covers_every_reloadable_field() -> None:
    assert set(RELOAD_CASES) == set(RELOADABLE)


@pytest.fixture(autouse=True)
def _root_level() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)


@pytest.mark.parametrize("field", sorted(RELOAD_CASES), ids=sorted(RELOAD_CASES))
async def test_reloadable_field_changes_the_running_behaviour(field: str) -> None:
    base, value, probe, engine = RELOAD_CASES[field]
    rig = _Rig(base, engine())
    before = await probe(rig)
    changed: dict[str, Any] = {field: value}
    result = rig.reload(dataclasses.replace(base, **changed))
    assert result["settings"] == "reloaded"
    assert result["applied"] == [field]
    assert result["restart_required"] == []
    assert getattr(rig.live.settings, field) == value
    assert await probe(rig) != before


def _different(field: dataclasses.Field[Any], value: Any) -> Any:
    """A value of ``field``'s type unlike ``value`` (validity does not matter: a
    restart-only field is never applied)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, Enum):
        return next(m for m in type(value) if m is not value)
    if isinstance(value, tuple):
        return (*value, "x-reload")
    if isinstance(value, Path):
        return Path(f"{value}.new")
    if isinstance(value, Secret) or "Secret" in str(field.type):
        return Secret(SECRET_VALUE)
    if "Path" in str(field.type):
        return Path("reloaded.file")
    if isinstance(value, str) or "str" in str(field.type):
        return f"{value or 'http://reload.test'}x"
    raise AssertionError(f"no different value for {field.name}: {field.type}")


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


@pytest.mark.parametrize("field", sorted(RESTART_ONLY), ids=sorted(RESTART_ONLY))
def test_restart_only_field_is_reported_by_name_and_not_applied(field: str) -> None:
    base = Settings()
    rig = _Rig(base, FakeEngine(True))
    new = dataclasses.replace(base, **{field: _different(FIELDS[field], getattr(base, field))})
    result = rig.reload(new)
    assert result["settings"] == "reloaded"
    assert result["applied"] == []
    assert result["restart_required"] == [field]
    assert rig.live.settings == base
    assert SECRET_VALUE not in json.dumps(result, default=str)


async def test_bad_settings_file_is_refused_whole(tmp_path: Path) -> None:
    base = Settings()
    rig = _Rig(base, FakeEngine(True))
    file = tmp_path / "authz.yaml"
    file.write_text("decision_timeout_ms: 2000\nmode: dry_run\nlog_level: loud\n")
    result = rig.reload(lambda: load({}, file))
    assert result["settings"] == "refused"
    assert "log_level" in result["error"]
    assert result["applied"] == []
    assert rig.live.settings == base
    assert rig.control.mode is Mode.ENFORCE
    await rig.authorizer.check(check_request())
    assert rig.engine.calls[-1][2] <= base.decision_timeout_s
    assert rig.actions == []


async def test_bypass_not_allowed_at_startup_refuses_the_whole_reload() -> None:
    base = Settings()
    rig = _Rig(base, FakeEngine(True))
    new = dataclasses.replace(base, mode=Mode.BYPASS, decision_timeout_ms=2000, log_level="ERROR")
    level = logging.getLogger().level
    result = rig.reload(new)
    assert result["settings"] == "refused"
    assert "AUTHZ_ALLOW_BYPASS" in result["error"]
    assert rig.live.settings == base
    assert logging.getLogger().level == level
    await rig.authorizer.check(check_request())
    assert rig.engine.calls[-1][2] <= base.decision_timeout_s


def test_reload_reports_applied_and_restart_fields_together_and_audits_the_mode() -> None:
    base = Settings()
    rig = _Rig(base, FakeEngine(True))
    new = dataclasses.replace(
        base, mode=Mode.DRY_RUN, opa_token=Secret(SECRET_VALUE), grpc_addr="0.0.0.0:1"
    )
    result = rig.reload(new)
    assert result["applied"] == ["mode"]
    assert result["restart_required"] == ["grpc_addr", "opa_token"]
    assert SECRET_VALUE not in json.dumps(result, default=str)
    assert rig.actions == [
        (
            "set_mode",
            {"mode": "dry-run", "previous": "enforce", "actor": "t", "reason": "settings reloaded"},
        )
    ]
    # Restart-only changes stay reported until a restart; nothing new is applied again.
    again = rig.reload(new)
    assert again["applied"] == []
    assert again["restart_required"] == ["grpc_addr", "opa_token"]


def test_reload_resets_a_mode_changed_through_the_admin_api() -> None:
    rig = _Rig(Settings(), FakeEngine(True))
    rig.control.set_mode(Mode.DRY_RUN, actor="admin", reason="test")
    result = rig.reload(Settings())
    assert result["applied"] == ["mode"]
    assert rig.control.mode is Mode.ENFORCE


def test_reload_refusal_raises_nothing_for_a_config_error_from_the_reader() -> None:
    rig = _Rig(Settings(), FakeEngine(True))

    def reader() -> Settings:
        raise ConfigError("AUTHZ_DECISION_TIMEOUT_MS='x': not an integer")

    result = rig.reload(reader)
    assert result["settings"] == "refused"
    assert result["error"].startswith("AUTHZ_DECISION_TIMEOUT_MS")


# --- the fleet (issue #16) ----------------------------------------------------------------


class _RecordingFleet:
    """Stands in for :class:`authz.runtime.fleet.Fleet`: records invalidations."""

    def __init__(self) -> None:
        self.invalidated: list[str] = []

    def invalidate(self, why: str) -> None:
        self.invalidated.append(why)


def test_every_bundle_activation_but_a_replicas_first_empties_the_fleets_caches() -> None:
    metrics = Metrics()
    fleet = _RecordingFleet()
    activated = _FleetActivation(metrics, cast(Fleet, fleet))
    activated("rev-1")  # this replica starting: nothing changed for the others
    assert fleet.invalidated == []
    activated("rev-2")
    assert fleet.invalidated == ["bundle revision rev-2"]
    assert metrics.registry.get_sample_value("authz_bundle_activations_total") == 2
    _FleetActivation(metrics, None)("rev-3")  # without Redis: metrics only
    assert metrics.registry.get_sample_value("authz_bundle_activations_total") == 3


def test_without_redis_there_is_no_fleet() -> None:
    assert build_fleet(Settings(), _no_push, None, Metrics(), lambda *_: None) is None


async def _no_push(document: dict[str, Any]) -> None:
    return None
