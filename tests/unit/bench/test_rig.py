"""The benchmark's Envoy and OPA configs, derived from the repository's own files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from authz.runtime import config
from authz.stack.supervisor import StackError
from bench.rig import (
    AUTHZ_SETUPS,
    BARE_ENV,
    MAX_UNIX_PATH,
    PEER_DECISION_PATH,
    SETUPS,
    VEGETA_HEADERS,
    Binaries,
    Rig,
    gateway_config,
    opa_config,
    opa_socket_path,
    upstream_config,
)
from tests.helpers import ROOT

GATEWAY = ROOT / "infra/envoy/envoy-gateway.yaml"


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    (item,) = listener["filter_chains"][0]["filters"]
    hcm: dict[str, Any] = item["typed_config"]
    return hcm


def _endpoint(config: dict[str, Any], cluster: str) -> tuple[str, int]:
    (found,) = [c for c in config["static_resources"]["clusters"] if c["name"] == cluster]
    socket = found["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    return socket["socket_address"]["address"], socket["socket_address"]["port_value"]


def test_gateway_with_ext_authz() -> None:
    config = gateway_config(
        GATEWAY, port=1001, admin_port=1002, upstream_port=1003, authz_port=1004
    )
    hcm = _hcm(config)
    assert "access_log" not in hcm
    assert [f["name"] for f in hcm["http_filters"]] == [
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.router",
    ]
    assert _endpoint(config, "authz") == ("127.0.0.1", 1004)
    assert _endpoint(config, "upstream_api") == ("127.0.0.1", 1003)
    assert config["admin"]["address"]["socket_address"]["port_value"] == 1002
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 1001}


def test_gateway_without_ext_authz_is_otherwise_the_same() -> None:
    limit = gateway_config(GATEWAY, port=1, admin_port=2, upstream_port=3, authz_port=None)
    authz = gateway_config(GATEWAY, port=1, admin_port=2, upstream_port=3, authz_port=4)
    limit_hcm, authz_hcm = _hcm(limit), _hcm(authz)
    assert [f["name"] for f in limit_hcm["http_filters"]] == ["envoy.filters.http.router"]
    route = limit_hcm["route_config"]["virtual_hosts"][0]["routes"][0]
    assert "typed_per_filter_config" not in route
    assert [c["name"] for c in limit["static_resources"]["clusters"]] == ["upstream_api"]
    # Path normalization, timeouts etc. are the same in both.
    for key in (
        "normalize_path",
        "merge_slashes",
        "path_with_escaped_slashes_action",
        "request_timeout",
    ):
        assert limit_hcm[key] == authz_hcm[key]


def test_upstream_answers_directly() -> None:
    config = upstream_config(2001, 2002)
    route = _hcm(config)["route_config"]["virtual_hosts"][0]["routes"][0]
    assert route["direct_response"]["status"] == 200
    assert "clusters" not in config["static_resources"]


@pytest.mark.parametrize("plugin", [None, "127.0.0.1:3003"], ids=["opa", "peer"])
def test_opa_config(plugin: str | None) -> None:
    config = opa_config(
        ROOT / "infra/opa/opa-local.yaml",
        bundles_url="http://127.0.0.1:3001/bundles",
        resource="keys-100.tar.gz",
        plugin_addr=plugin,
    )
    assert config["services"]["bundles"]["url"] == "http://127.0.0.1:3001/bundles"
    assert config["bundles"]["authz"]["resource"] == "keys-100.tar.gz"
    if plugin is None:
        assert "plugins" not in config
    else:
        grpc = config["plugins"]["envoy_ext_authz_grpc"]
        assert grpc["addr"] == plugin
        assert grpc["path"] == PEER_DECISION_PATH


@pytest.mark.parametrize("authz_port", [None, 4], ids=["limit", "ext_authz"])
def test_vegeta_headers_are_removed_before_any_filter(authz_port: int | None) -> None:
    # vegeta numbers every request (X-Vegeta-Seq): left in, it would make every decision
    # cache key unique and sit in every input; no real client sends it.
    config = gateway_config(GATEWAY, port=1, admin_port=2, upstream_port=3, authz_port=authz_port)
    (early,) = _hcm(config)["early_header_mutation_extensions"]
    assert early["name"] == "envoy.http.early_header_mutation.header_mutation"
    removed = [m["remove"] for m in early["typed_config"]["mutations"]]
    assert sorted(removed) == sorted(VEGETA_HEADERS) == ["x-vegeta-attack", "x-vegeta-seq"]


def test_setups_include_the_ceiling_and_authz_without_logs() -> None:
    assert SETUPS == ("limit", "ceiling", "peer", "authz", "authz-bare")
    assert set(AUTHZ_SETUPS) == {"authz", "authz-bare"}
    # The decision log and the audit trail off, as authz's own settings read them; the
    # shipped defaults have both on.
    bare, shipped = config.load(BARE_ENV), config.load({})
    assert (bare.decision_log, bare.audit_db) == (False, None)
    assert shipped.decision_log is True
    assert shipped.audit_db is not None


def _no_short_dir() -> Path:
    raise AssertionError("a short directory was made for a path that fits")


@pytest.mark.parametrize(
    ("depth", "in_run_dir"), [(1, True), (120, False)], ids=["fits", "too-deep"]
)
def test_opa_socket_path_always_fits_a_unix_socket(
    tmp_path: Path, depth: int, in_run_dir: bool
) -> None:
    """The socket stays in the run directory when its path fits sun_path, else moves to
    the short directory: a deep run directory never falls back to TCP."""
    run_dir = tmp_path / ("d" * depth)
    short = tmp_path / "s"
    path = opa_socket_path(
        run_dir, "authz-bare-keys-100000", _no_short_dir if in_run_dir else lambda: short
    )
    assert path.name == "authz-bare-keys-100000-opa.sock"
    assert path.parent == (run_dir.resolve() if in_run_dir else short)
    assert len(str(path).encode()) <= MAX_UNIX_PATH


def test_opa_socket_path_refuses_a_short_directory_that_is_not(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="longer than a unix socket path"):
        opa_socket_path(tmp_path / ("d" * 120), "authz", lambda: tmp_path / ("s" * 120))


def test_the_rig_serves_opa_on_a_unix_socket_by_default(tmp_path: Path) -> None:
    """As shipped (the stack, Compose, Kubernetes): authz's OPA URL is a unix socket."""
    binaries = Binaries(envoy="envoy", opa="opa", vegeta="vegeta")
    assert Rig(ROOT, tmp_path, tmp_path, binaries).opa_socket is True
    assert Rig(ROOT, tmp_path, tmp_path, binaries, opa_socket=False).opa_socket is False
