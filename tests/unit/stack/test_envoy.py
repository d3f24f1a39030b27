"""stack.envoy.render: the repo's Envoy config on other ports, nothing else changed."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.core.input import MAX_BODY_BYTES
from authz.stack.envoy import BodyRoute, relocate_tls, render

GATEWAY = Path("infra/envoy/envoy-gateway.yaml")


def load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded


def by_name(config: dict[str, Any], kind: str, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        item for item in config["static_resources"][kind] if item["name"] == name
    ]
    [item] = found
    return item


def socket_addresses(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    return [
        (
            endpoint["endpoint"]["address"]["socket_address"]["address"],
            endpoint["endpoint"]["address"]["socket_address"]["port_value"],
        )
        for group in cluster["load_assignment"]["endpoints"]
        for endpoint in group["lb_endpoints"]
    ]


def expected(
    original: dict[str, Any],
    admin_port: int,
    listeners: Mapping[str, int],
    clusters: Mapping[str, tuple[str, int]],
) -> dict[str, Any]:
    """``original`` with the edits render() should make, applied by hand."""
    config = copy.deepcopy(original)
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    for name, port in listeners.items():
        by_name(config, "listeners", name)["address"]["socket_address"]["port_value"] = port
    for name, (address, port) in clusters.items():
        for group in by_name(config, "clusters", name)["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                endpoint["endpoint"]["address"]["socket_address"].update(
                    address=address, port_value=port
                )
    return config


@pytest.mark.parametrize(
    ("listeners", "clusters"),
    [
        ({"gateway": 18080}, {"authz": ("127.0.0.1", 19191), "upstream_api": ("127.0.0.2", 18090)}),
        ({}, {"authz": ("127.0.0.1", 19191)}),
        ({"gateway": 18080}, {}),
    ],
    ids=["everything", "one-cluster", "listener-only"],
)
def test_render_gateway(
    repo_root: Path,
    listeners: Mapping[str, int],
    clusters: Mapping[str, tuple[str, int]],
) -> None:
    source = repo_root / GATEWAY
    before = source.read_text(encoding="utf-8")
    original = load(source)
    rendered = yaml.safe_load(
        render(source, admin_port=19901, listeners=listeners, clusters=clusters)
    )
    assert rendered == expected(original, 19901, listeners, clusters)
    assert rendered["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 19901,
    }
    gateway = by_name(rendered, "listeners", "gateway")["address"]["socket_address"]
    assert gateway["port_value"] == listeners.get("gateway", 8080)
    assert socket_addresses(by_name(rendered, "clusters", "authz")) == [
        clusters.get("authz", ("127.0.0.1", 9191))
    ]
    assert socket_addresses(by_name(rendered, "clusters", "upstream_api")) == [
        clusters.get("upstream_api", ("127.0.0.1", 8090))
    ]
    assert source.read_text(encoding="utf-8") == before  # the file itself is untouched


def test_render_rewrites_every_endpoint_of_a_cluster(tmp_path: Path) -> None:
    endpoint = {
        "endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 1}}}
    }
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}},
        "static_resources": {
            "clusters": [
                {
                    "name": "multi",
                    "load_assignment": {
                        "cluster_name": "multi",
                        "endpoints": [
                            {"lb_endpoints": [endpoint, copy.deepcopy(endpoint)]},
                            {"lb_endpoints": [copy.deepcopy(endpoint)]},
                        ],
                    },
                }
            ]
        },
    }
    source = tmp_path / "envoy.yaml"
    source.write_text(yaml.safe_dump(config), encoding="utf-8")
    rendered = yaml.safe_load(
        render(source, admin_port=1, listeners={}, clusters={"multi": ("127.0.0.1", 2)})
    )
    assert socket_addresses(by_name(rendered, "clusters", "multi")) == [("127.0.0.1", 2)] * 3


@pytest.mark.parametrize(
    ("listeners", "clusters", "missing"),
    [
        ({"egress": 1}, {}, "egress"),
        ({"gateway": 1}, {"opa": ("127.0.0.1", 2)}, "opa"),
        ({}, {"upstream": ("127.0.0.1", 2)}, "upstream"),
    ],
    ids=["unknown-listener", "unknown-cluster", "near-miss-cluster-name"],
)
def test_render_unknown_name_raises(
    repo_root: Path,
    listeners: Mapping[str, int],
    clusters: Mapping[str, tuple[str, int]],
    missing: str,
) -> None:
    with pytest.raises(KeyError, match=missing):
        render(repo_root / GATEWAY, admin_port=1, listeners=listeners, clusters=clusters)


def _gateway_as_is(repo_root: Path, **options: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The committed gateway config and its render with its own admin port (9901), no
    listener or cluster moved, and ``options`` (render's keyword arguments)."""
    source = repo_root / GATEWAY
    rendered = render(source, admin_port=9901, listeners={}, clusters={}, **options)
    return load(source), yaml.safe_load(rendered)


def test_render_moves_the_tls_files_and_secures_listeners(repo_root: Path, tmp_path: Path) -> None:
    """The local stack's TLS: every file under /etc/envoy-tls moves to the run directory
    (the mTLS client certificate to authz), and ``tls_listeners`` get the listener
    certificate; nothing else changes."""
    original, plain = _gateway_as_is(repo_root)
    assert plain == original
    _, rendered = _gateway_as_is(repo_root, tls_dir=tmp_path, tls_listeners=["gateway"])
    common = by_name(rendered, "clusters", "authz")["transport_socket"]["typed_config"][
        "common_tls_context"
    ]
    assert common["tls_certificates"][0]["certificate_chain"] == {
        "filename": str(tmp_path / "envoy-client/tls.crt")
    }
    assert common["validation_context"]["trusted_ca"] == {
        "filename": str(tmp_path / "envoy-client/ca.crt")
    }
    (chain,) = by_name(rendered, "listeners", "gateway")["filter_chains"]
    listener_tls = chain.pop("transport_socket")["typed_config"]
    assert listener_tls["@type"].endswith("DownstreamTlsContext")
    assert listener_tls["common_tls_context"]["tls_certificates"] == [
        {
            "certificate_chain": {"filename": str(tmp_path / "envoy-gateway/tls.crt")},
            "private_key": {"filename": str(tmp_path / "envoy-gateway/tls.key")},
        }
    ]
    assert "/etc/envoy-tls" not in yaml.safe_dump(rendered)
    relocate_tls(original, tmp_path)
    assert rendered == original


def gateway_routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    (chain,) = by_name(config, "listeners", "gateway")["filter_chains"]
    (hcm,) = chain["filters"]
    routes: list[dict[str, Any]] = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    return routes


def test_body_routes_ask_for_the_body_in_front_of_the_catch_all(repo_root: Path) -> None:
    """Each BodyRoute is the catch-all route (same cluster, same decision path) for its
    prefix, plus ``parse_body: "true"`` and ``with_request_body`` (README "Request
    bodies"), in front of every other route, in the order given; nothing else changes."""
    original, rendered = _gateway_as_is(
        repo_root,
        body_routes=[BodyRoute("/api/v1/admin/upload"), BodyRoute("/small", 1024, False)],
    )
    upload, small, *rest = gateway_routes(rendered)
    assert rest == gateway_routes(original)
    catch_all = gateway_routes(original)[-1]
    for route, prefix, limit, partial in (
        (upload, "/api/v1/admin/upload", MAX_BODY_BYTES, True),
        (small, "/small", 1024, False),
    ):
        expected_route = copy.deepcopy(catch_all)
        expected_route["match"] = {"prefix": prefix}
        settings = expected_route["typed_per_filter_config"]["envoy.filters.http.ext_authz"][
            "check_settings"
        ]
        settings["context_extensions"]["parse_body"] = "true"
        settings["with_request_body"] = {
            "max_request_bytes": limit,
            "allow_partial_message": partial,
        }
        assert route == expected_route
    gateway_routes(rendered)[:2] = []
    assert rendered == original


def test_body_routes_refuse_a_gateway_without_a_catch_all_route(tmp_path: Path) -> None:
    config = load(Path(__file__).resolve().parents[3] / GATEWAY)
    gateway_routes(config)[-1]["match"] = {"prefix": "/api/"}
    source = tmp_path / "gateway.yaml"
    source.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(ValueError, match="catch-all"):
        render(source, admin_port=1, listeners={}, clusters={}, body_routes=[BodyRoute("/x")])
