"""authz.tools.egress_envoy: the egress Envoy bootstrap from the services data, its drift
check, and TLS for every service with a credential."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.core.headers import (
    CREDENTIAL_HEADERS,
    FORWARDING_HEADERS,
    IDENTITY_HEADERS,
    TUNNEL_ADDRESS_HEADER,
)
from authz.tools import egress_envoy
from authz.tools.egress_envoy import DECISION_PATH, generate, main, parse_base_url, render
from authz.tools.services import parse_service
from tests.helpers import ROOT
from tests.helpers.egress import SERVICES_FILE, real_services, svc

COMMITTED = ROOT / "infra/envoy/envoy-egress.yaml"
GATEWAY = ROOT / "infra/envoy/envoy-gateway.yaml"


def listener(config: Mapping[str, Any], name: str = "egress") -> dict[str, Any]:
    [found] = [item for item in config["static_resources"]["listeners"] if item["name"] == name]
    return dict(found)


def hcm(config: Mapping[str, Any]) -> dict[str, Any]:
    """The HTTP connection manager of the egress listener (or of the only listener: the
    gateway's)."""
    listeners = config["static_resources"]["listeners"]
    found = listeners[0] if len(listeners) == 1 else listener(config)
    [chain] = found["filter_chains"]
    [network_filter] = chain["filters"]
    typed: dict[str, Any] = network_filter["typed_config"]
    return typed


def cluster(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    [found] = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    return dict(found)


def virtual_host(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    [found] = [v for v in hcm(config)["route_config"]["virtual_hosts"] if v["name"] == name]
    return dict(found)


def endpoint(c: Mapping[str, Any]) -> tuple[str, int]:
    [group] = c["load_assignment"]["endpoints"]
    [lb] = group["lb_endpoints"]
    sock = lb["endpoint"]["address"]["socket_address"]
    return sock["address"], sock["port_value"]


def context_extensions(route: Mapping[str, Any]) -> dict[str, str]:
    per_route = route["typed_per_filter_config"]["envoy.filters.http.ext_authz"]
    assert per_route["@type"].endswith("ext_authz.v3.ExtAuthzPerRoute")
    extensions: dict[str, str] = per_route["check_settings"]["context_extensions"]
    return extensions


# -- clusters and routes, one row per kind of base_url ---------------------------------

CLUSTER_CASES = [
    # base_url, overrides, type, endpoint, tls, host_rewrite, prefix_rewrite
    (
        "https://api.openai.com",
        {},
        "LOGICAL_DNS",
        ("api.openai.com", 443),
        True,
        "api.openai.com",
        None,
    ),
    (
        "https://API.Example.com:8443/v1/",
        {},
        "LOGICAL_DNS",
        ("api.example.com", 8443),
        True,
        "api.example.com:8443",
        "/v1/",
    ),
    (
        "https://api.openai.com",
        {"api.openai.com": ("127.0.0.1", 9443)},
        "STATIC",
        ("127.0.0.1", 9443),
        True,
        "api.openai.com",
        None,
    ),
    (
        "http://internal.example:8080/base",
        {},
        "LOGICAL_DNS",
        ("internal.example", 8080),
        False,
        "internal.example:8080",
        "/base/",
    ),
    ("http://10.0.0.7", {}, "LOGICAL_DNS", ("10.0.0.7", 80), False, "10.0.0.7", None),
    (
        "http://[::1]:8090",
        {"::1": ("127.0.0.1", 1234)},
        "STATIC",
        ("127.0.0.1", 1234),
        False,
        "[::1]:8090",
        None,
    ),
    (
        "https://api.openai.com",
        {"other.example.com": ("127.0.0.1", 9443)},
        "LOGICAL_DNS",
        ("api.openai.com", 443),
        True,
        "api.openai.com",
        None,
    ),
]


@pytest.mark.parametrize(
    ("base_url", "overrides", "kind", "address", "tls", "host_rewrite", "prefix_rewrite"),
    CLUSTER_CASES,
    ids=[
        "https",
        "https-port-path",
        "https-override",
        "http-path",
        "http-ip",
        "http-ipv6-override",
        "unrelated-override",
    ],
)
def test_service_cluster_and_route(
    base_url: str,
    overrides: dict[str, tuple[str, int]],
    kind: str,
    address: tuple[str, int],
    tls: bool,
    host_rewrite: str,
    prefix_rewrite: str | None,
) -> None:
    config = generate(
        {"svc": svc(base_url, credential=tls)}, overrides=overrides, ca_file="/ca.pem"
    )
    c = cluster(config, "service_svc")
    assert c["type"] == kind
    assert endpoint(c) == address
    assert ("dns_lookup_family" in c) == (kind == "LOGICAL_DNS")
    if kind == "LOGICAL_DNS":
        assert c["dns_lookup_family"] == "V4_PREFERRED"
    assert ("transport_socket" in c) == tls
    [route] = virtual_host(config, "service_svc")["routes"]
    assert route["match"] == {"prefix": "/"}
    assert route["route"]["cluster"] == "service_svc"
    assert route["route"]["host_rewrite_literal"] == host_rewrite
    assert route["route"].get("prefix_rewrite") == prefix_rewrite
    assert route["route"]["timeout"] == "120s"


@pytest.mark.parametrize(
    "overrides",
    [{}, {"api.openai.com": ("127.0.0.1", 9443)}],
    ids=["dns", "override"],
)
def test_https_cluster_checks_sni_and_san_of_the_real_host(
    overrides: dict[str, tuple[str, int]],
) -> None:
    config = generate(
        {"openai": svc("https://api.openai.com")}, overrides=overrides, ca_file="/run/ca.pem"
    )
    socket = cluster(config, "service_openai")["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    tls = socket["typed_config"]
    assert tls["@type"].endswith("transport_sockets.tls.v3.UpstreamTlsContext")
    assert tls["sni"] == "api.openai.com"
    assert tls["common_tls_context"]["validation_context"] == {
        "trusted_ca": {"filename": "/run/ca.pem"},
        "match_typed_subject_alt_names": [
            {"san_type": "DNS", "matcher": {"exact": "api.openai.com"}}
        ],
    }


def test_virtual_hosts_per_service_and_catch_all() -> None:
    services = {"openai": svc("https://api.openai.com"), "b-2": svc("https://b.example")}
    config = generate(services)
    hosts = hcm(config)["route_config"]["virtual_hosts"]
    # Sorted by name, catch-all last (domains must be unique; "*" matches only leftovers).
    assert [v["name"] for v in hosts] == [
        "service_b-2",
        "service_openai",
        "intercept_b-2",
        "intercept_openai",
        "unknown_service",
    ]
    for name in services:
        vhost = virtual_host(config, f"service_{name}")
        assert vhost["domains"] == [name, f"{name}:*"]
        [route] = vhost["routes"]
        assert context_extensions(route) == {
            "decision_path": DECISION_PATH,
            "service": name,
            "hop": "outer",
        }
    catch_all = virtual_host(config, "unknown_service")
    assert catch_all["domains"] == ["*"]
    [connect, route] = catch_all["routes"]
    assert connect["match"] == {"connect_matcher": {}}
    assert connect["route"]["cluster"] == "tunnel"
    assert context_extensions(connect) == {
        "decision_path": DECISION_PATH,
        "service": "",
        "hop": "outer",
        "tunnel": "true",
    }
    assert "route" not in route
    assert route["direct_response"]["status"] == 404
    assert json.loads(route["direct_response"]["body"]["inline_string"]) == {
        "error": "unknown_service"
    }
    assert context_extensions(route) == {
        "decision_path": DECISION_PATH,
        "service": "",
        "hop": "outer",
    }


def test_no_services_still_denies_through_authz() -> None:
    config = generate({})
    # authz, and the tunnel cluster (whose CONNECTs the policy decides); no interception.
    assert [c["name"] for c in config["static_resources"]["clusters"]] == ["authz", "tunnel"]
    assert [item["name"] for item in config["static_resources"]["listeners"]] == ["egress"]
    [vhost] = hcm(config)["route_config"]["virtual_hosts"]
    assert vhost["name"] == "unknown_service"


def test_ports_and_addresses() -> None:
    config = generate(
        {},
        listen_port=18443,
        admin_port=19902,
        listen_address="0.0.0.0",
        authz_address=("10.1.2.3", 19191),
    )
    [listener] = config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 18443}
    # Admin stays on loopback whatever the listener binds.
    assert config["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 19902,
    }
    assert endpoint(cluster(config, "authz")) == ("10.1.2.3", 19191)


# -- parity with the gateway -----------------------------------------------------------


def gateway() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(GATEWAY.read_text(encoding="utf-8"))
    return loaded


def test_ext_authz_filter_is_the_gateways() -> None:
    # Neither proxy's filter sends authz a body (the gateway's routes ask per route).
    expected = copy.deepcopy(hcm(gateway())["http_filters"][0])
    assert expected["name"] == "envoy.filters.http.ext_authz"
    assert "with_request_body" not in expected["typed_config"]
    filters = hcm(generate({}))["http_filters"]
    assert filters[1] == expected
    assert [f["name"] for f in filters] == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.set_filter_state",
        "envoy.filters.http.router",
    ]


def test_authz_cluster_is_the_gateways() -> None:
    assert cluster(generate({}), "authz") == cluster(gateway(), "authz")


def test_authz_cluster_is_mtls_checking_authzs_san() -> None:
    """Envoy -> authz carries every credential: TLS with Envoy's client certificate, and
    authz's certificate must carry the SAN "authz" and chain to the mounted CA."""
    socket = cluster(generate({}), "authz")["transport_socket"]
    context = socket["typed_config"]
    assert context["@type"].endswith("tls.v3.UpstreamTlsContext")
    assert context["sni"] == "authz"
    common = context["common_tls_context"]
    directory = egress_envoy.AUTHZ_CLIENT_TLS_DIR
    assert common["tls_certificates"] == [
        {
            "certificate_chain": {"filename": f"{directory}/tls.crt"},
            "private_key": {"filename": f"{directory}/tls.key"},
        }
    ]
    validation = common["validation_context"]
    assert validation["trusted_ca"] == {"filename": f"{directory}/ca.crt"}
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "authz"}}
    ]


def test_connection_manager_normalizes_paths() -> None:
    manager = hcm(generate({}))
    assert manager["normalize_path"] is True
    assert manager["merge_slashes"] is True
    assert manager["path_with_escaped_slashes_action"] == "REJECT_REQUEST"


def test_egress_removes_every_forwarding_header() -> None:
    # Client-sent X-Forwarded-For, X-Real-IP, Forwarded, X-Forwarded-Host and method
    # overrides never reach a third party: removed by the route config, so even an allow
    # the policy did not decide (bypass, fail-open) cannot pass them; Envoy adds no
    # x-forwarded-for of its own (skip_xff_append).
    manager = hcm(generate(real_services()))
    assert manager["use_remote_address"] is True
    assert manager["xff_num_trusted_hops"] == 0
    assert manager["skip_xff_append"] is True
    removed = manager["route_config"]["request_headers_to_remove"]
    assert set(FORWARDING_HEADERS) <= set(removed)
    assert "request_headers_to_add" not in manager["route_config"]


@pytest.mark.parametrize("name", sorted(real_services()), ids=sorted(real_services()))
def test_service_gets_no_sandbox_credential_or_identity_header(name: str) -> None:
    # Even an allow no policy decided (dry-run, bypass, fail-open) forwards no
    # x-sandbox-id, cookie or api-key: Envoy removes every credential and identity header
    # on its way to the service, except the header authz injects the service's credential
    # into (set by ext_authz before the router applies these).
    services = real_services()
    removed = virtual_host(generate(services), f"service_{name}")["request_headers_to_remove"]
    injected = services[name].get("credential", {}).get("header")
    expected = {*CREDENTIAL_HEADERS, *IDENTITY_HEADERS} - {injected}
    assert set(removed) == expected


def test_gateway_sets_its_own_forwarding_headers() -> None:
    # The gateway's upstream learns the client's address from Envoy: x-forwarded-for is
    # overwritten with the connection's address, x-forwarded-proto is Envoy's (it
    # overwrites a client's value when it trusts no hop), the rest are removed.
    manager = hcm(gateway())
    assert manager["use_remote_address"] is True
    assert manager["xff_num_trusted_hops"] == 0
    route_config = manager["route_config"]
    assert set(route_config["request_headers_to_remove"]) == set(FORWARDING_HEADERS) - {
        "x-forwarded-for",
        "x-forwarded-proto",
    }
    assert route_config["request_headers_to_add"] == [
        {
            "header": {
                "key": "x-forwarded-for",
                "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
            },
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]


def test_access_log_fields() -> None:
    [log, _] = hcm(generate({}))["access_log"]
    fields = log["typed_config"]["log_format"]["json_format"]
    gateway_fields = hcm(gateway())["access_log"][0]["typed_config"]["log_format"]["json_format"]
    assert fields["proxy"] == "egress"
    assert fields["path"] == "%PATH(NQ:ORIG_OR_PATH)%"
    for key in ("decision_id", "sandbox_id", "service"):
        assert fields[key] == f"%DYNAMIC_METADATA(envoy.filters.http.ext_authz:{key})%"
    # Everything the gateway logs except its key id.
    assert set(gateway_fields) - {"key_id"} <= set(fields)


@pytest.mark.parametrize("services", [{}, real_services()], ids=["no-services", "real"])
def test_answered_connects_stream_their_end_to_authzs_access_log_service(
    services: dict[str, Any],
) -> None:
    """Plain and intercepted tunnels are both CONNECTs of the outer listener: its gRPC
    access log (only CONNECTs answered 200) goes to the mTLS authz cluster and logs no
    request header (a Proxy-Authorization must never leave)."""
    config = generate(services)
    [grpc_log] = [
        log for log in hcm(config)["access_log"] if log["name"] == "envoy.access_loggers.http_grpc"
    ]
    typed = grpc_log["typed_config"]
    assert typed["@type"].endswith("access_loggers.grpc.v3.HttpGrpcAccessLogConfig")
    assert typed["common_config"]["grpc_service"] == {"envoy_grpc": {"cluster_name": "authz"}}
    assert typed["common_config"]["log_name"] == egress_envoy.TUNNEL_LOG_NAME
    assert not {k for k in typed if k.startswith("additional_")}
    [method, status] = grpc_log["filter"]["and_filter"]["filters"]
    assert method["header_filter"]["header"] == {
        "name": ":method",
        "string_match": {"exact": "CONNECT"},
    }
    assert status["status_code_filter"]["comparison"]["op"] == "EQ"
    assert status["status_code_filter"]["comparison"]["value"]["default_value"] == 200
    # The inner (intercepted) requests are not tunnels: no gRPC log there.
    inner = [
        chain
        for other in config["static_resources"]["listeners"][1:]
        for chain in other["filter_chains"]
    ]
    parsed = [parse_service(name, services[name]) for name in services]
    assert len(inner) == len(egress_envoy.intercepted_hosts(parsed))
    for chain in inner:
        names = [log["name"] for log in chain_hcm(chain).get("access_log", [])]
        assert "envoy.access_loggers.http_grpc" not in names


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("services", "overrides", "message"),
    [
        ({"s": svc("ftp://example.com")}, {}, "'s': base_url must be an http or https URL"),
        ({"s": svc("example.com/v1")}, {}, "'s': base_url must be an http or https URL"),
        ({"s": svc("https://")}, {}, "'s': base_url has no host"),
        ({"s": svc("https://:443/v1")}, {}, "'s': base_url has no host"),
        ({"s": svc("https://a.example?x=1")}, {}, "'s': base_url must not have a query"),
        ({"s": svc("https://a.example?")}, {}, "'s': base_url must not have a query"),
        ({"s": svc("https://a.example/#f")}, {}, "'s': base_url must not have a query"),
        ({"s": svc("https://u:p@a.example")}, {}, "'s': base_url must not carry user info"),
        ({"s": svc("https://a.example:99999")}, {}, "'s': base_url has an invalid port"),
        ({"s": svc("https://[::1")}, {}, "'s': base_url is not a URL"),
        ({"s": svc("https://exa mple.com")}, {}, "'s': base_url has an invalid host"),
        ({"s": svc("https://a.example./")}, {}, "'s': base_url has an invalid host"),
        ({"s": svc("https://10.0.0.1")}, {}, "'s': base_url must name a DNS host"),
        ({"s": svc(42)}, {}, "'s': base_url must be a non-empty string"),
        ({"s": svc("")}, {}, "'s': base_url must be a non-empty string"),
        ({"s": {"display_name": "x"}}, {}, "'s': base_url must be a non-empty string"),
        ({"s": "https://a.example"}, {}, "'s': must be an object"),
        ({"Open AI": svc("https://a.example")}, {}, "'Open AI': the name must be"),
        ({"*": svc("https://a.example")}, {}, r"'\*': the name must be"),
        ({"": svc("https://a.example")}, {}, "'': the name must be"),
        (
            {"s": svc("https://a.example")},
            {"a.example": ("localhost", 9443)},
            "'s': override for 'a.example' must be an IP address",
        ),
        (
            {"s": {"base_url": "https://a.example", "credential": {"header": ""}}},
            {},
            "'s': credential.header must be a lowercase header name",
        ),
        (
            {"s": {"base_url": "https://a.example", "credential": {"header": "X-Api-Key"}}},
            {},
            "'s': credential.header must be a lowercase header name",
        ),
        (
            {"s": {"base_url": "https://a.example", "credential": "x-api-key"}},
            {},
            "'s': credential must be an object",
        ),
    ],
    ids=[
        "ftp",
        "no-scheme",
        "no-host",
        "port-no-host",
        "query",
        "empty-query",
        "fragment",
        "userinfo",
        "bad-port",
        "bad-ipv6",
        "space-in-host",
        "trailing-dot",
        "https-ip",
        "not-a-string",
        "empty",
        "missing",
        "spec-not-object",
        "name-space",
        "name-star",
        "name-empty",
        "override-not-ip",
        "credential-header-empty",
        "credential-header-uppercase",
        "credential-not-object",
    ],
)
def test_bad_services_raise_naming_service_and_field(
    services: dict[str, Any], overrides: dict[str, tuple[str, int]], message: str
) -> None:
    with pytest.raises(ValueError, match=f"egress service {message}"):
        generate(services, overrides=overrides)


def test_parse_base_url() -> None:
    upstream = parse_base_url("s", "HTTPS://Api.Example.COM/v1//")
    assert (upstream.scheme, upstream.host, upstream.port, upstream.path) == (
        "https",
        "api.example.com",
        443,
        "/v1",
    )
    assert upstream.tls
    assert upstream.authority == "api.example.com"


# -- the committed config and the command line ------------------------------------------


def test_committed_config_is_generated_from_the_services() -> None:
    """Drift: infra/envoy/envoy-egress.yaml is exactly the generator's output."""
    assert COMMITTED.read_text(encoding="utf-8") == render(real_services()), (
        "infra/envoy/envoy-egress.yaml is stale: run python -m authz.tools.egress_envoy"
    )


def test_committed_config_has_every_real_service() -> None:
    config = yaml.safe_load(COMMITTED.read_text(encoding="utf-8"))
    for name, spec in real_services().items():
        host = parse_base_url(name, spec["base_url"]).host
        c = cluster(config, f"service_{name}")
        assert endpoint(c) == (host, 443)
        tls = c["transport_socket"]["typed_config"]
        assert tls["sni"] == host
        assert tls["common_tls_context"]["validation_context"]["trusted_ca"] == {
            "filename": egress_envoy.DEFAULT_CA_FILE
        }


def test_check_passes_on_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["--check"]) == 0


def test_render_header_names_the_command() -> None:
    text = render({}, source="a/data.json", out="b/envoy.yaml")
    assert text.startswith("# GENERATED from a/data.json")
    assert "python -m authz.tools.egress_envoy --services a/data.json --out b/envoy.yaml" in text
    body = yaml.safe_load(text)
    assert body == generate({})


def test_write_then_check_then_drift(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(SERVICES_FILE, tmp_path / "data.json")
    args = ["--services", "data.json", "--out", "out/envoy-egress.yaml"]
    assert main([*args, "--check"]) == 1  # missing file is drift
    assert main(args) == 0
    assert main([*args, "--check"]) == 0
    out = tmp_path / "out/envoy-egress.yaml"
    assert out.read_text() == render(
        real_services(), source="data.json", out="out/envoy-egress.yaml"
    )
    data = json.loads((tmp_path / "data.json").read_text())
    data["services"]["openai"]["base_url"] = "https://api.openai.example"
    (tmp_path / "data.json").write_text(json.dumps(data))
    capsys.readouterr()
    assert main([*args, "--check"]) == 1
    assert "out of date" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "error:"),
        ("[]", ".services must be an object"),
        ('{"services": []}', ".services must be an object"),
        ('{"services": {"s": {"base_url": "ftp://x"}}}', "egress service 's'"),
    ],
    ids=["not-json", "not-object", "services-not-object", "bad-service"],
)
def test_bad_services_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    (tmp_path / "data.json").write_text(content)
    out = tmp_path / "envoy.yaml"
    assert main(["--services", str(tmp_path / "data.json"), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------------------
# A service with a credential is only reached over TLS: an ``http://`` base_url for it is
# refused by the generator, naming the service and the URL: the injected secret never
# crosses a hop in clear.


CREDENTIAL = {"header": "authorization", "format": "Bearer {secret}"}


@pytest.mark.parametrize(
    "base_url",
    [
        "http://api.example.com",
        "HTTP://api.example.com:8080/v1",
        "http://10.0.0.7",
        "http://127.0.0.1:8080",
        "http://[::1]:8090",
    ],
    ids=["dns", "upper-case-port-path", "ip", "loopback", "ipv6"],
)
@pytest.mark.parametrize(
    "credential",
    [CREDENTIAL, {}, {"header": "x-api-key"}],
    ids=["full", "empty-object", "partial"],
)
def test_plain_http_base_url_is_refused_for_a_service_with_a_credential(
    base_url: str, credential: dict[str, Any]
) -> None:
    services = {
        "ok": {"base_url": "https://ok.example.com", "credential": CREDENTIAL},
        "leaky": {"base_url": base_url, "credential": credential},
    }
    with pytest.raises(ValueError, match="credential") as caught:
        generate(services)
    message = str(caught.value)
    assert message.startswith("egress service 'leaky': ")
    assert repr(base_url) in message
    assert "https" in message


@pytest.mark.parametrize(
    "spec",
    [
        {"base_url": "http://internal.example:8080"},
        {"base_url": "http://internal.example:8080", "credential": None},
        {"base_url": "https://api.example.com", "credential": CREDENTIAL},
    ],
    ids=["http-no-credential", "http-null-credential", "https-credential"],
)
def test_plain_http_is_allowed_only_without_a_credential(spec: dict[str, Any]) -> None:
    config = generate({"svc": spec})
    clusters = [c["name"] for c in config["static_resources"]["clusters"]]
    assert "service_svc" in clusters


def test_generator_command_exits_2_naming_the_service_and_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {"services": {"leaky": {"base_url": "http://api.example.com", "credential": CREDENTIAL}}}
    (tmp_path / "data.json").write_text(json.dumps(data))
    out = tmp_path / "envoy.yaml"
    assert main(["--services", str(tmp_path / "data.json"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "egress service 'leaky'" in err
    assert "'http://api.example.com'" in err
    assert not out.exists()


# -- issue 18: interception, identity into the tunnel, tunnels, durations ---------------

_HCM_NAME = "envoy.filters.network.http_connection_manager"


def intercept_chain(config: Mapping[str, Any], host: str) -> dict[str, Any]:
    """The internal listener's filter chain for ``host`` (by SNI)."""
    chains = listener(config, egress_envoy.INTERCEPT_LISTENER)["filter_chains"]
    [found] = [c for c in chains if c["filter_chain_match"]["server_names"] == [host]]
    return dict(found)


def chain_hcm(chain: Mapping[str, Any]) -> dict[str, Any]:
    [network_filter] = chain["filters"]
    assert network_filter["name"] == _HCM_NAME
    typed: dict[str, Any] = network_filter["typed_config"]
    return typed


@pytest.mark.parametrize(
    ("base_url", "intercepted"),
    [
        ("https://api.example.com", True),
        ("https://api.example.com:443", True),
        ("https://api.example.com/v1", False),
        ("https://api.example.com:8443", False),
        ("http://api.example.com", False),
    ],
    ids=["https", "https-443", "path-prefix", "other-port", "http"],
)
def test_only_https_443_services_without_a_prefix_are_intercepted(
    base_url: str, intercepted: bool
) -> None:
    config = generate({"s": svc(base_url, credential=base_url.startswith("https"))})
    names = [v["name"] for v in hcm(config)["route_config"]["virtual_hosts"]]
    assert ("intercept_s" in names) is intercepted
    listeners = [item["name"] for item in config["static_resources"]["listeners"]]
    assert (egress_envoy.INTERCEPT_LISTENER in listeners) is intercepted


def test_two_services_on_one_host_are_refused() -> None:
    services = {"a": svc("https://api.example.com"), "b": svc("https://api.example.com")}
    with pytest.raises(ValueError, match=r"'a' and 'b' share the host 'api\.example\.com'"):
        generate(services)


def test_connect_to_an_intercepted_host_goes_to_the_internal_listener() -> None:
    config = generate(real_services())
    vhost = virtual_host(config, "intercept_openai")
    assert vhost["domains"] == ["api.openai.com", "api.openai.com:80", "api.openai.com:443"]
    connect, absolute = vhost["routes"]
    assert connect["match"] == {"connect_matcher": {}}
    assert connect["route"]["cluster"] == egress_envoy.INTERCEPT_LISTENER
    assert connect["route"]["upgrade_configs"] == [
        {"upgrade_type": "CONNECT", "connect_config": {}}
    ]
    assert context_extensions(connect) == {
        "decision_path": DECISION_PATH,
        "service": "openai",
        "hop": "outer",
    }
    # Absolute-form (HTTP_PROXY) requests to the real host: checked as a proxy request.
    assert absolute["route"]["cluster"] == "service_openai"
    assert context_extensions(absolute)["proxy"] == "true"
    assert "proxy-authorization" in vhost["request_headers_to_remove"]


def test_identity_reaches_the_tunnel_only_through_hashable_filter_state() -> None:
    """The trap: an envoy.string filter state shares one connection pool between
    tunnels, and a new connection carries another sandbox's identity and credential."""
    filters = hcm(generate(real_services()))["http_filters"]
    names = [f["name"] for f in filters]
    assert names.index("envoy.filters.http.set_filter_state") > names.index(
        "envoy.filters.http.ext_authz"
    )
    [state] = filters[names.index("envoy.filters.http.set_filter_state")]["typed_config"][
        "on_request_headers"
    ]
    assert state["object_key"] == egress_envoy.SANDBOX_FILTER_STATE
    assert state["factory_key"] == "envoy.hashable_string"
    assert state["shared_with_upstream"] == "ONCE"
    assert "sandbox_id" in state["format_string"]["text_format_source"]["inline_string"]
    intercept = cluster(generate(real_services()), egress_envoy.INTERCEPT_LISTENER)
    assert intercept["connection_pool_per_downstream_connection"] is True


@pytest.mark.parametrize("host", ["api.openai.com", "api.anthropic.com", "api.github.com"])
def test_inner_requests_carry_the_tunnels_identity_never_the_clients(host: str) -> None:
    config = generate(real_services())
    chain = intercept_chain(config, host)
    directory = f"{egress_envoy.INTERCEPT_TLS_DIR}/{host}"
    [certificate] = chain["transport_socket"]["typed_config"]["common_tls_context"][
        "tls_certificates"
    ]
    assert certificate["certificate_chain"]["filename"] == f"{directory}/tls.crt"
    manager = chain_hcm(chain)
    filters = manager["http_filters"]
    assert [f["name"] for f in filters] == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.router",
    ]
    remove, append = filters[0]["typed_config"]["mutations"]["request_mutations"]
    assert remove == {"remove": "x-sandbox-id"}
    assert append["append"]["header"] == {
        "key": "x-sandbox-id",
        "value": f"%FILTER_STATE({egress_envoy.SANDBOX_FILTER_STATE}:PLAIN)%",
    }
    assert append["append"]["append_action"] == "OVERWRITE_IF_EXISTS_OR_ADD"
    service, fronted = manager["route_config"]["virtual_hosts"]
    assert service["domains"] == [host, f"{host}:443"]
    [route] = service["routes"]
    assert context_extensions(route)["hop"] == "inner"
    assert "x-sandbox-id" in service["request_headers_to_remove"]
    # Another Host inside the tunnel is decided too (then 404).
    assert fronted["domains"] == ["*"]
    [other] = fronted["routes"]
    assert context_extensions(other) == {
        "decision_path": DECISION_PATH,
        "service": "",
        "hop": "inner",
    }


def test_tunnel_connects_only_to_the_address_authz_checked() -> None:
    config = generate(real_services())
    tunnel = cluster(config, "tunnel")
    assert tunnel["type"] == "ORIGINAL_DST"
    assert tunnel["original_dst_lb_config"] == {
        "use_http_header": True,
        "http_header_name": TUNNEL_ADDRESS_HEADER,
    }
    # A client-sent value is removed before ext_authz (which sets it on a tunnel's allow).
    first = hcm(config)["http_filters"][0]
    assert first["typed_config"]["mutations"]["request_mutations"] == [
        {"remove": TUNNEL_ADDRESS_HEADER}
    ]


@pytest.mark.parametrize("seconds", [egress_envoy.TUNNEL_MAX_DURATION_S, 30])
def test_tunnels_and_connections_inside_them_have_a_bounded_lifetime(seconds: int) -> None:
    config = generate(real_services(), tunnel_max_duration_s=seconds)
    connects = [
        route
        for vhost in hcm(config)["route_config"]["virtual_hosts"]
        for route in vhost["routes"]
        if route["match"] == {"connect_matcher": {}}
    ]
    assert len(connects) == 1 + len(real_services())  # every shipped service is intercepted
    for route in connects:
        assert route["route"]["max_stream_duration"] == {"max_stream_duration": f"{seconds}s"}
    for chain in listener(config, egress_envoy.INTERCEPT_LISTENER)["filter_chains"]:
        options = chain_hcm(chain)["common_http_protocol_options"]
        assert options == {"max_connection_duration": f"{seconds}s"}


def test_tunnel_duration_must_be_positive() -> None:
    with pytest.raises(ValueError, match="tunnel_max_duration_s must be at least 1, got 0"):
        generate({}, tunnel_max_duration_s=0)
