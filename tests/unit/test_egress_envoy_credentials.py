"""A service with a credential is only reached over TLS: an ``http://`` base_url for it is
refused by the generator, naming the service and the URL.

Finding 9 of issue #13: an ``http://`` base_url was accepted for a service with a
credential, so the injected secret would cross a hop in clear.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from authz.tools.egress_envoy import generate, main

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
