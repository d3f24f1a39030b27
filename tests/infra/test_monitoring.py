"""Monitoring configs: Prometheus config and alert rules (promtool), the Grafana
dashboard, Loki/Alloy labels, the OpenTelemetry Collector and Tempo configs.

Every metric a dashboard panel or an alert names must exist where it is scraped: authz's
names come from ``authz.runtime.metrics.Metrics`` (the one place authz defines them), Envoy's
from a real Envoy running the deployment configs, OPA's from a real OPA running the
deployment config. Label matchers and grouping labels must exist on those metrics too.
PromQL syntax is checked by promtool (each panel query as a recording rule).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram, Info, Summary, generate_latest

from authz.core.cache import DecisionCache
from authz.core.record import DecisionRecord
from authz.runtime.metrics import Metrics, MetricsSink
from authz.stack.supervisor import Process, free_port, http_ok
from tests.helpers.infra import (
    ROOT,
    DeployEnvoy,
    KeyPair,
    build_bundle,
    compose_command,
    deployment_tls,
    http_get,
)

MONITORING = ROOT / "infra/monitoring"
PROMETHEUS = MONITORING / "prometheus"
DASHBOARD = MONITORING / "grafana/dashboards/authz.json"
# Labels Prometheus adds to every scraped series (prometheus.yml: job, instance, proxy).
TARGET_LABELS = frozenset({"job", "instance", "proxy"})
GRAFANA_RANGE = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}

# -- PromQL: which metrics and labels an expression names ---------------------------------

_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "atan2", "inf", "nan", "start", "end"}
)
_IDENT = r"[a-zA-Z_:][a-zA-Z0-9_:]*"


def promql_names(expr: str) -> tuple[set[str], dict[str, set[str]], set[str]]:
    """(metric names, metric -> label names its matchers use, grouping label names) of a
    PromQL expression. Strings, ranges and durations are removed first; a selector is
    ``name{matchers}`` or a bare name not followed by ``(`` (functions, aggregations)."""
    # {__name__="x", ...} is x{...}; then string contents cannot look like syntax.
    text = re.sub(r'\{\s*__name__\s*=\s*"([^"]*)"\s*,?', r"\1{", expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    grouping: set[str] = set()
    for match in re.finditer(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text
    ):
        grouping.update(n.strip() for n in match.group(2).split(",") if n.strip())
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    metrics: set[str] = set()
    matchers: dict[str, set[str]] = {}
    for match in re.finditer(rf"({_IDENT})?\s*\{{([^}}]*)\}}", text):
        labels = set(re.findall(rf"({_IDENT})\s*(?:=~|!~|!=|=)", match.group(2)))
        name = match.group(1)
        assert name is not None, f"a selector without a metric name in {expr!r}"
        metrics.add(name)
        matchers.setdefault(name, set()).update(labels)
    text = re.sub(rf"({_IDENT})?\s*\{{[^}}]*\}}", " ", text)
    for match in re.finditer(rf"(?<![\w:.])({_IDENT})(?![\w:])(?!\s*\()", text):
        name = match.group(1)
        if name not in _KEYWORDS and not re.fullmatch(r"\d+[smhdwy]", name):
            metrics.add(name)
            matchers.setdefault(name, set())
    return metrics, matchers, grouping


@pytest.mark.parametrize(
    ("expr", "metrics", "labels", "grouping"),
    [
        ("up", {"up"}, {"up": set()}, set()),
        (
            'sum by (code) (rate(x_total{a="1", b=~"b|c"}[5m])) / on (code) y',
            {"x_total", "y"},
            {"x_total": {"a", "b"}, "y": set()},
            {"code"},
        ),
        (
            'histogram_quantile(0.99, sum by (le) (rate(h_bucket{p="}"}[$__rate_interval])))',
            {"h_bucket"},
            {"h_bucket": {"p"}},
            {"le"},
        ),
        ('{__name__="z", k="v"} > bool 1', {"z"}, {"z": {"k"}}, set()),
        ("max(a) == 1 and min(b offset 5m) unless c", {"a", "b", "c"}, None, set()),
    ],
    ids=["bare", "matchers-on", "quantile", "__name__", "keywords"],
)
def test_promql_names(
    expr: str, metrics: set[str], labels: dict[str, set[str]] | None, grouping: set[str]
) -> None:
    """The extraction the checks below rely on (it must not miss a name)."""
    found, matchers, groups = promql_names(expr)
    assert found == metrics
    if labels is not None:
        assert matchers == labels
    assert groups == grouping


# -- what is actually exposed ---------------------------------------------------------


def _authz_metrics() -> dict[str, set[str] | None]:
    """authz's series names -> label names (None: any, for info metrics), with the
    decision cache's collector attached (as the server attaches it)."""
    metrics = Metrics()
    metrics.watch_decision_cache(DecisionCache())
    exposed: dict[str, set[str] | None] = _scraped(generate_latest(metrics.registry).decode())
    for value in vars(metrics).values():
        if not isinstance(value, Counter | Gauge | Histogram | Info | Summary):
            continue
        name, labels = value._name, set(value._labelnames)
        if isinstance(value, Counter):
            exposed[f"{name}_total"] = labels
        elif isinstance(value, Histogram):
            exposed[f"{name}_bucket"] = labels | {"le"}
            exposed[f"{name}_sum"] = exposed[f"{name}_count"] = labels
        elif isinstance(value, Info):
            exposed[f"{name}_info"] = None
        else:
            exposed[name] = labels
    assert "authz_decisions_total" in exposed
    return exposed


def _scraped(text: str) -> dict[str, set[str] | None]:
    """Series names -> label names in a text exposition, as Prometheus stores them
    (prometheus_client's parser would rename counters without ``_total``)."""
    exposed: dict[str, set[str] | None] = {}
    for line in text.splitlines():
        match = re.match(rf"({_IDENT})(\{{.*\}})?\s", line)
        if line.startswith("#") or not match:
            continue
        labels = exposed.setdefault(match.group(1), set())
        assert labels is not None
        labels.update(re.findall(r'(\w+)="', match.group(2) or ""))
    return exposed


@pytest.fixture(scope="module")
def envoy_metrics(deploy_envoys: dict[str, DeployEnvoy]) -> dict[str, set[str] | None]:
    """Both deployment Envoys' /stats/prometheus, after one request each."""
    exposed: dict[str, set[str] | None] = {}
    for proxy in deploy_envoys.values():
        # The listeners speak TLS (certificate for localhost).
        url = f"https://localhost:{proxy.listener}/api/v1/status"
        http_get(url, {"host": "openai"}, ca_file=proxy.ca)
        _, raw = http_get(f"http://127.0.0.1:{proxy.admin}/stats/prometheus")
        for name, labels in _scraped(raw.decode()).items():
            known = exposed.setdefault(name, set())
            assert known is not None
            known.update(labels or set())
    assert "envoy_http_downstream_rq_xx" in exposed
    return exposed


@pytest.fixture(scope="module")
def opa_metrics(
    opa_bin: str, tmp_path_factory: pytest.TempPathFactory, signing_keys: KeyPair
) -> Iterator[dict[str, set[str] | None]]:
    """OPA's /metrics as deployed (docker-compose.yaml's command), after it refused an
    unsigned bundle and answered one request."""
    base = tmp_path_factory.mktemp("opa-metrics")
    assert build_bundle(base / "served", "unsigned").returncode == 0
    bundle_port, api, diag = free_port(), free_port(), free_port()
    server = Process(
        "bundles",
        [
            sys.executable,
            "-m",
            "authz.stack.bundles",
            f"--dir={base}/served",
            f"--port={bundle_port}",
        ],
        base / "bundles.log",
        lambda: http_ok(f"http://127.0.0.1:{bundle_port}/healthz"),
        cwd=ROOT,
    )
    tls_dir = deployment_tls(base / "tls")  # what tls-init writes to the volume "tls"
    (base / "run").mkdir(exist_ok=True)  # the volume opa-socket (/run/opa)
    args = [
        arg.replace("/run/opa/", f"{base}/run/")
        .replace("/tls/", f"{tls_dir}/")  # first: ROOT may contain "/tls/" (a worktree)
        .replace("/config/opa.yaml", str(ROOT / "infra/opa/opa.yaml"))
        .replace("/policy/system", str(ROOT / "infra/opa/system"))
        .replace("/keys/bundle-signing.pub.pem", str(signing_keys.public))
        .replace("0.0.0.0:8181", f"127.0.0.1:{api}")
        .replace("0.0.0.0:8282", f"127.0.0.1:{diag}")
        for arg in compose_command("opa")
    ]
    opa = Process(
        "opa",
        [opa_bin, *args, f"--set=services.bundles.url=http://127.0.0.1:{bundle_port}/bundles"],
        base / "opa.log",
        lambda: http_ok(f"http://127.0.0.1:{diag}/health"),
        env={"AUTHZ_OPA_TOKEN": "tok_" + "2" * 48},
    )
    server.start()
    try:
        server.wait_ready(15)
        opa.start()
        opa.wait_ready(20)
        # One (denied) request; the API speaks TLS only.
        http_get(f"https://127.0.0.1:{api}/v1/data", ca_file=tls_dir / "ca.crt")
        for _ in range(100):
            _, raw = http_get(f"http://127.0.0.1:{diag}/metrics")
            if b"bundle_failed_load_counter{" in raw:
                break
            opa.wait_ready(1)
        exposed = _scraped(raw.decode())
        assert "bundle_failed_load_counter" in exposed
        yield exposed
    finally:
        opa.stop()
        server.stop()


@pytest.fixture(scope="module")
def exposed(
    envoy_metrics: dict[str, set[str] | None], opa_metrics: dict[str, set[str] | None]
) -> dict[str, set[str] | None]:
    """Every series name Prometheus can see here -> its label names."""
    return {
        **_authz_metrics(),
        **envoy_metrics,
        **opa_metrics,
        "up": set(),
    }


def _check_expr(expr: str, exposed: dict[str, set[str] | None], where: str) -> None:
    metrics, matchers, grouping = promql_names(expr)
    assert metrics, f"{where}: no metric in {expr!r}"
    available: set[str] = set(TARGET_LABELS)
    for name in metrics:
        assert name in exposed, f"{where}: {name} is exposed by neither authz, Envoy nor OPA"
        labels = exposed[name]
        if labels is None:
            available.add("*")
            continue
        available |= labels
        unknown = matchers[name] - labels - TARGET_LABELS
        assert not unknown, f"{where}: {name} has no label {sorted(unknown)}"
    if "*" not in available:
        assert grouping <= available, f"{where}: no such label {sorted(grouping - available)}"


# -- Prometheus -----------------------------------------------------------------------


def _promtool(
    promtool: str, *args: str, cwd: Path = PROMETHEUS
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, check=False, cwd=cwd, timeout=60
    )


def test_prometheus_config(promtool_bin: str) -> None:
    result = _promtool(promtool_bin, "check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules(promtool_bin: str) -> None:
    result = _promtool(promtool_bin, "check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    result = _promtool(promtool_bin, "test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


BROKEN_CONFIG = {
    "unknown key": ("scrape_interval: 15s", "scrape_intervall: 15s"),
    "bad duration": ("scrape_interval: 15s", "scrape_interval: 15 seconds"),
    "missing rule file": ("  - alerts.yml", "  - alerts-missing.yml"),
}
BROKEN_RULES = {
    "bad PromQL": ('expr: up{job="authz"} == 0', 'expr: up{job="authz" == 0'),
    "bad for": ("for: 1m", "for: one minute"),
    "unknown field": ("        labels:\n          severity: critical", "        labelz: {}"),
}


@pytest.mark.parametrize("change", BROKEN_CONFIG.values(), ids=BROKEN_CONFIG.keys())
def test_broken_prometheus_config_is_rejected(
    promtool_bin: str, tmp_path: Path, change: tuple[str, str]
) -> None:
    old, new = change
    text = (PROMETHEUS / "prometheus.yml").read_text()
    assert old in text
    (tmp_path / "prometheus.yml").write_text(text.replace(old, new, 1))
    (tmp_path / "alerts.yml").write_text((PROMETHEUS / "alerts.yml").read_text())
    result = _promtool(promtool_bin, "check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode != 0


@pytest.mark.parametrize("change", BROKEN_RULES.values(), ids=BROKEN_RULES.keys())
def test_broken_rules_are_rejected(
    promtool_bin: str, tmp_path: Path, change: tuple[str, str]
) -> None:
    old, new = change
    text = (PROMETHEUS / "alerts.yml").read_text()
    assert old in text
    (tmp_path / "alerts.yml").write_text(text.replace(old, new, 1))
    result = _promtool(promtool_bin, "check", "rules", "alerts.yml", cwd=tmp_path)
    assert result.returncode != 0


def test_alert_unit_test_can_fail(promtool_bin: str, tmp_path: Path) -> None:
    """The alert unit tests catch a changed threshold."""
    rules = (PROMETHEUS / "alerts.yml").read_text()
    changed = 'expr: max by (instance) (authz_opa_circuit_state{state="open"}) == 1'
    assert changed in rules
    (tmp_path / "alerts.yml").write_text(rules.replace(changed, changed.replace("== 1", "== 2")))
    (tmp_path / "alerts_test.yml").write_text((PROMETHEUS / "alerts_test.yml").read_text())
    result = _promtool(promtool_bin, "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0


def _alert_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [(rule["alert"], rule["expr"]) for group in groups for rule in group["rules"]]


def test_alerts_name_exposed_metrics(exposed: dict[str, set[str] | None]) -> None:
    for alert, expr in _alert_exprs():
        _check_expr(expr, exposed, f"alert {alert}")


# The alerts on the safety controls (issue #17) and the ones they replace or complete:
# each has a promtool test where it fires and one where it stays silent.
SAFETY_ALERTS = (
    "AuthzDown",
    "AuthzAbsent",
    "AuthzBypassMode",
    "AuthzDryRunMode",
    "AuthzFailOpen",
    "AuthzOPAErrorRatio",
    "AuthzAuditDegraded",
    "AuthzSecretsNotLoaded",
    "AuthzBundleNotActivated",
    "OPABundleStale",
    "AuthzDecisionLogDropping",
)
RUNBOOK_DOC = "infra/README.md"


def _rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return groups


def _alert_tests() -> dict[str, dict[bool, list[str]]]:
    """alert name -> {fires: [names of the promtool tests expecting it to fire (True) or
    expecting no alert (False)]}, from alerts_test.yml."""
    found: dict[str, dict[bool, list[str]]] = {}
    for case in yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            kinds = found.setdefault(check["alertname"], {True: [], False: []})
            kinds[bool(check.get("exp_alerts"))].append(case["name"])
    return found


def test_every_safety_alert_has_a_firing_and_a_silent_test() -> None:
    alerts = {name for name, _ in _alert_exprs()}
    tests = _alert_tests()
    for alert in SAFETY_ALERTS:
        assert alert in alerts, alert
        assert tests.get(alert, {}).get(True), f"{alert}: no test where it fires"
        assert tests.get(alert, {}).get(False), f"{alert}: no test where it stays silent"


# An expression that never yields a series, and one that always does (the alert fires
# once its `for` has passed, with no labels of its own).
NEVER, ALWAYS = "vector(1) == 2", "vector(1)"


@pytest.mark.parametrize("fires", [False, True], ids=["never-fires", "always-fires"])
@pytest.mark.parametrize("alert", SAFETY_ALERTS)
def test_safety_alert_tests_catch_a_broken_rule(
    promtool_bin: str, tmp_path: Path, alert: str, fires: bool
) -> None:
    """The unit tests can fail, in the right test: a rule that never fires breaks the
    alert's firing test, one that always fires breaks its silent test."""
    groups = _rule_groups()
    (rule,) = [r for g in groups for r in g["rules"] if r.get("alert") == alert]
    rule["expr"] = ALWAYS if fires else NEVER
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump({"groups": groups}))
    (tmp_path / "alerts_test.yml").write_text((PROMETHEUS / "alerts_test.yml").read_text())
    result = _promtool(promtool_bin, "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    # The firing tests are the ones a never-firing rule breaks, and vice versa.
    expected = _alert_tests()[alert][not fires]
    output = result.stdout + result.stderr
    assert any(f"name: {name}," in output for name in expected), output


def _github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation but ``-`` and ``_``
    dropped, spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [("AuthzDown", "authzdown"), ("Alert runbooks", "alert-runbooks"), ("A.b: c", "ab-c")],
)
def test_github_anchor(heading: str, anchor: str) -> None:
    assert _github_anchor(heading) == anchor


def _runbook_sections() -> dict[str, str]:
    """Anchor -> body of each ``###`` section under ``## Alert runbooks`` in infra/README.md."""
    text = (ROOT / RUNBOOK_DOC).read_text()
    part = text.split("\n## Alert runbooks\n", 1)[1].split("\n## ", 1)[0]
    sections = re.split(r"^### (.+)$", part, flags=re.MULTILINE)
    pairs = zip(sections[1::2], sections[2::2], strict=True)
    return {_github_anchor(heading): body.strip() for heading, body in pairs}


def test_every_alert_links_its_runbook_section() -> None:
    sections = _runbook_sections()
    alerts = [rule for group in _rule_groups() for rule in group["rules"]]
    for rule in alerts:
        url = rule["annotations"].get("runbook_url", "")
        assert url == f"{RUNBOOK_DOC}#{_github_anchor(rule['alert'])}", rule["alert"]
        assert sections.get(url.split("#", 1)[1]), f"{rule['alert']}: no runbook section"
    # No section for an alert that does not exist (a renamed alert leaves none behind).
    assert set(sections) == {_github_anchor(rule["alert"]) for rule in alerts}


def _exposed_series(metrics: Metrics, instance: str) -> list[dict[str, str]]:
    """promtool input series: every sample of ``metrics``' exposition (what authz serves
    on /metrics) with the target labels Prometheus adds, held for 15 minutes."""
    series = [{"series": f'up{{job="authz",instance="{instance}"}}', "values": "1x15"}]
    for line in generate_latest(metrics.registry).decode().splitlines():
        if not line or line.startswith("#"):
            continue
        selector, value = line.rsplit(" ", 1)
        name, _, labels = selector.partition("{")
        labels = labels.removesuffix("}")
        target = f'job="authz",instance="{instance}"'
        series.append(
            {
                "series": f"{name}{{{target}{',' if labels else ''}{labels}}}",
                "values": f"{value}x15",
            }
        )
    return series


def _healthy() -> Metrics:
    """A replica as authz's server leaves it once serving: a bundle activated, the secrets
    file loaded, decisions counted (authz.runtime.server)."""
    metrics = Metrics()
    metrics.bundle.info({"revision": "r1"})
    metrics.bundle_activations.inc()
    metrics.secrets_loaded.set(1)
    MetricsSink(metrics).record(
        DecisionRecord("id", 0.001, "authz/gateway/decision", True, "allowed", 200)
    )
    return metrics


def _bypass(metrics: Metrics) -> None:
    metrics.set_mode("bypass")


def _dry_run(metrics: Metrics) -> None:
    metrics.set_mode("dry-run")


def _audit_degraded(metrics: Metrics) -> None:
    metrics.audit_degraded.set(1)


def _secrets_failed(metrics: Metrics) -> None:
    metrics.secrets_loaded.set(0)  # what a failed re-read does (server._secrets_reloaded)
    metrics.secrets_reload_failures.inc()


STATES: dict[str, tuple[Callable[[Metrics], None] | None, set[str]]] = {
    "healthy": (None, set()),
    "bypass": (_bypass, {"AuthzBypassMode"}),
    "dry-run": (_dry_run, {"AuthzDryRunMode"}),
    "audit-degraded": (_audit_degraded, {"AuthzAuditDegraded"}),
    "secrets-not-loaded": (_secrets_failed, {"AuthzSecretsNotLoaded"}),
}


@pytest.mark.parametrize("state", STATES.values(), ids=STATES.keys())
def test_safety_alerts_read_authz_metrics_as_authz_writes_them(
    promtool_bin: str, tmp_path: Path, state: tuple[Callable[[Metrics], None] | None, set[str]]
) -> None:
    """authz's own exposition (the Metrics class, changed the way the server changes it),
    held for 15 minutes: exactly the expected safety alerts fire, none on a healthy
    replica."""
    change, expected = state
    metrics = _healthy()
    if change is not None:
        change(metrics)
    _fired_on(promtool_bin, tmp_path, metrics, expected)


def test_no_bundle_fires_only_bundle_not_activated(promtool_bin: str, tmp_path: Path) -> None:
    metrics = Metrics()  # serving, but no bundle revision seen yet
    metrics.secrets_loaded.set(1)
    _fired_on(promtool_bin, tmp_path, metrics, {"AuthzBundleNotActivated"})


def _fired_on(promtool_bin: str, tmp_path: Path, metrics: Metrics, expected: set[str]) -> None:
    authz_alerts = [a for a in SAFETY_ALERTS if a != "OPABundleStale"]  # OPA's metric
    test = {
        "rule_files": [str(PROMETHEUS / "alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": _exposed_series(metrics, "authz-1:9192"),
                "alert_rule_test": [
                    {"eval_time": "12m", "alertname": alert, "exp_alerts": []}
                    for alert in authz_alerts
                ],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    result = _promtool(promtool_bin, "test", "rules", "test.yml", cwd=tmp_path)
    output = result.stdout + result.stderr
    fired = set(re.findall(r"alertname: (\w+), time", output))
    assert fired == expected, output
    assert (result.returncode == 0) == (not expected), output


# -- Kubernetes (Prometheus Operator) -----------------------------------------------------

OPERATOR_OBJECTS = ROOT / "infra/k8s/monitoring/prometheus-operator.yml"
# Fields of the Prometheus Operator CRDs (monitoring.coreos.com/v1) these objects may use;
# kubernetes-validate has no schema for them (test_k8s.py validates core kinds only).
RULE_FIELDS = frozenset({"alert", "record", "expr", "for", "keep_firing_for", "labels"})
RULE_FIELDS |= {"annotations"}
ENDPOINT_FIELDS = frozenset({"port", "path", "interval", "scheme", "relabelings"})
RELABEL_FIELDS = frozenset(
    {"action", "sourceLabels", "separator", "regex", "targetLabel", "replacement"}
)


def _operator_objects() -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for document in yaml.safe_load_all(OPERATOR_OBJECTS.read_text()):
        if document:
            found.setdefault(document["kind"], []).append(document)
    return found


def _k8s_services() -> list[dict[str, Any]]:
    return [
        document
        for path in sorted((ROOT / "infra/k8s/base").glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document and document.get("kind") == "Service"
    ]


def _selected(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions In/NotIn)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        inside = labels.get(expression["key"]) in expression["values"]
        if inside != (expression["operator"] == "In"):
            return False
    return True


def test_prometheus_rule_carries_alerts_yml() -> None:
    """The PrometheusRule cannot drift from alerts.yml (the file promtool tests)."""
    (rule,) = _operator_objects()["PrometheusRule"]
    assert rule["spec"]["groups"] == _rule_groups(), "copy alerts.yml's groups into it"


def test_prometheus_operator_objects_shape() -> None:
    objects = _operator_objects()
    assert set(objects) == {"PrometheusRule", "ServiceMonitor"}
    kustomization = yaml.safe_load((OPERATOR_OBJECTS.parent / "kustomization.yaml").read_text())
    # Beside the collector and Tempo (core objects, validated by test_k8s.py).
    assert kustomization["resources"] == [
        OPERATOR_OBJECTS.name,
        "otel-collector.yaml",
        "tempo.yaml",
    ]
    for kind, documents in objects.items():
        for document in documents:
            assert set(document) == {"apiVersion", "kind", "metadata", "spec"}, kind
            assert document["apiVersion"] == "monitoring.coreos.com/v1"
            assert document["metadata"]["namespace"] == kustomization["namespace"] == "authz"
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", document["metadata"]["name"])
    (rule,) = objects["PrometheusRule"]
    assert set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert set(group) == {"name", "rules"}
        for entry in group["rules"]:
            assert set(entry) <= RULE_FIELDS, entry
            assert "expr" in entry, entry


def test_service_monitors_scrape_the_jobs_the_alerts_name() -> None:
    """Every ServiceMonitor endpoint is a named port of a Service it selects, and the
    jobs they produce are the ones the alerts match on (as prometheus.yml in Compose)."""
    services = _k8s_services()
    jobs: set[str] = set()
    for monitor in _operator_objects()["ServiceMonitor"]:
        spec = monitor["spec"]
        assert set(spec) == {"selector", "namespaceSelector", "endpoints"}
        selected = [
            s
            for s in services
            if s["metadata"]["namespace"] in spec["namespaceSelector"]["matchNames"]
            and _selected(spec["selector"], s["metadata"].get("labels", {}))
        ]
        assert selected, monitor["metadata"]["name"]
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= ENDPOINT_FIELDS, endpoint
            ports = {p.get("name") for s in selected for p in s["spec"]["ports"]}
            assert endpoint["port"] in ports, endpoint
            for relabel in endpoint["relabelings"]:
                assert set(relabel) <= RELABEL_FIELDS, relabel
                if relabel["targetLabel"] == "job":
                    jobs.add(relabel["replacement"])
    named = {job for _, expr in _alert_exprs() for job in re.findall(r'job="([^"]+)"', expr)}
    compose = {
        job["job_name"]
        for job in yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]
    }
    assert named <= jobs == compose


# -- Grafana --------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _queries(datasource: str) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in _panels()
        for target in panel["targets"]
        if target["datasource"]["uid"] == datasource
    ]


def test_dashboard_structure() -> None:
    dashboard = _dashboard()
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    datasources = yaml.safe_load(
        (MONITORING / "grafana/provisioning/datasources/datasources.yaml").read_text()
    )["datasources"]
    uids = {d["uid"]: d["type"] for d in datasources}
    for panel in _panels():
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert uids[target["datasource"]["uid"]] == target["datasource"]["type"]
    # What the issue asks the dashboard to show.
    exprs = " ".join(expr for _, expr in _queries("prometheus"))
    for needle in (
        'envoy_http_conn_manager_prefix="gateway"',
        'envoy_http_conn_manager_prefix="egress"',
        "envoy_http_downstream_rq_time_bucket",
        "authz_decisions_total",
        "authz_rate_limit_rejections_total",
        "authz_opa_errors_total",
        "authz_opa_circuit_state",
        # The safety and cache panels (issue #17).
        'authz_decision_cache_lookups_total{result="hit"}',
        "authz_fail_open_total",
        "authz_dry_run_suppressed_total",
        "authz_overrides_active",
        "authz_expiring_key_decisions_total",
    ):
        assert needle in exprs, needle
    assert _queries("loki")


def test_dashboard_queries_parse(promtool_bin: str, tmp_path: Path) -> None:
    """Every Prometheus query is valid PromQL (as a recording rule, Grafana's range
    variables replaced by durations)."""
    rules = []
    for index, (_, expr) in enumerate(_queries("prometheus")):
        for variable, value in GRAFANA_RANGE.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query{index}", "expr": expr})
    (tmp_path / "queries.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "q", "rules": rules}]})
    )
    result = _promtool(promtool_bin, "check", "rules", "queries.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_name_exposed_metrics(exposed: dict[str, set[str] | None]) -> None:
    for title, expr in _queries("prometheus"):
        _check_expr(expr, exposed, f"panel {title!r}")


def test_a_dashboard_typo_is_caught(exposed: dict[str, set[str] | None]) -> None:
    """The check can fail: a misspelt metric, and a label the metric does not have."""
    with pytest.raises(AssertionError, match="exposed by neither"):
        _check_expr("rate(authz_decision_total[5m])", exposed, "typo")
    with pytest.raises(AssertionError, match="has no label"):
        _check_expr('rate(authz_decisions_total{tier="x"}[5m])', exposed, "label")
    with pytest.raises(AssertionError, match="no such label"):
        _check_expr("sum by (service) (rate(authz_decisions_total[5m]))", exposed, "by")


ALLOY = MONITORING / "alloy/config.alloy"


def _alloy_blocks(text: str) -> dict[str, str]:
    """Top-level Alloy components, ``kind "label"`` -> body, of an Alloy configuration
    (https://grafana.com/docs/alloy/latest/get-started/configuration-syntax/): comments
    dropped, braces balanced (no brace appears inside a string in these files)."""
    text = re.sub(r"^\s*//.*$", "", text, flags=re.MULTILINE)
    assert text.count("{") == text.count("}"), "unbalanced braces"
    blocks: dict[str, str] = {}
    position = 0
    while match := re.compile(r'([a-z_][\w.]*)\s+"(\w+)"\s*\{').search(text, position):
        depth, index = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            index += 1
        key = f"{match.group(1)}.{match.group(2)}"
        assert key not in blocks, f"{key} twice"
        blocks[key] = text[match.end() : index - 1]
        position = index
    assert not text[position:].strip(), f"outside any block: {text[position:].strip()[:80]}"
    return blocks


def _alloy_labels() -> set[str]:
    """The stream labels Alloy gives each line: relabel targets and stage.labels keys."""
    blocks = _alloy_blocks(ALLOY.read_text())
    labels = set(re.findall(r'target_label\s*=\s*"(\w+)"', blocks["discovery.relabel.containers"]))
    for stage in re.findall(r"stage\.labels\s*\{\s*values\s*=\s*\{([^}]*)\}", ALLOY.read_text()):
        labels |= set(re.findall(r"(\w+)\s*=", stage))
    return labels


def test_alloy_components_are_wired() -> None:
    """No Alloy binary here (see infra/README.md): every component reference names a
    declared component, the Docker source forwards through the JSON stage to Loki, and
    the labels are the ones promtail gave (the log panels use them)."""
    blocks = _alloy_blocks(ALLOY.read_text())
    assert set(blocks) == {
        "discovery.docker.containers",
        "discovery.relabel.containers",
        "loki.source.docker.containers",
        "loki.process.json_lines",
        "loki.write.loki",
    }
    for body in blocks.values():
        for kind, label in re.findall(
            r"((?:discovery|loki)(?:\.[a-z_]+)+)\.(\w+)\.(?:targets|rules|receiver)\b", body
        ):
            assert f"{kind}.{label}" in blocks, f"{kind}.{label}"
    source = blocks["loki.source.docker.containers"]
    assert "discovery.docker.containers.targets" in source
    assert "discovery.relabel.containers.rules" in source
    assert "loki.process.json_lines.receiver" in source
    assert "loki.write.loki.receiver" in blocks["loki.process.json_lines"]
    assert _alloy_labels() == {"service", "project", "container", "stream", "level", "type"}


def test_alloy_parser_rejects_broken_configs() -> None:
    """The structural check can fail: unbalanced braces, a stray statement."""
    text = ALLOY.read_text()
    with pytest.raises(AssertionError, match="unbalanced"):
        _alloy_blocks(text + "\n}")
    with pytest.raises(AssertionError, match="outside any block"):
        _alloy_blocks(text + '\nlogging = "debug"\n')


def _log_fields() -> set[str]:
    """Fields of the JSON log lines the log panels filter on: authz's decision log and
    operational log, and the Envoy access logs (gateway and egress)."""
    record = DecisionRecord("id", 0.0, "authz/gateway/decision", False, "x", 403)
    fields = set(record.log_fields()) | {"time", "level", "logger", "msg"}
    for proxy in ("gateway", "egress"):
        config = yaml.safe_load((ROOT / f"infra/compose/envoy/envoy-{proxy}.yaml").read_text())
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        # The JSON line on stdout (egress also streams tunnel ends to authz over gRPC).
        (access_log,) = [
            log
            for log in hcm["typed_config"]["access_log"]
            if log["name"] == "envoy.access_loggers.stdout"
        ]
        fields |= set(access_log["typed_config"]["log_format"]["json_format"])
    return fields


def test_log_panels_use_existing_labels_and_fields() -> None:
    labels, fields = _alloy_labels(), _log_fields()
    services = set(
        yaml.safe_load((ROOT / "infra/compose/docker-compose.yaml").read_text())["services"]
    )
    for title, expr in _queries("loki"):
        selector = re.match(r"\{([^}]*)\}", expr)
        assert selector, title
        for label, _, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', selector.group(1)):
            assert label in labels, f"{title}: stream label {label}"
            if label == "service":
                assert set(value.split("|")) <= services, f"{title}: {value}"
        for field in re.findall(
            r"\|\s*(\w+)\s*(?:=~|!~|!=|==|=|>=|<=|>|<)", expr[selector.end() :]
        ):
            assert field in fields, f"{title}: log field {field}"


def test_loki_and_alloy_configs_agree() -> None:
    """No Loki/Alloy binary is available here (see infra/README.md): the configs must at
    least parse and agree with each other."""
    loki = yaml.safe_load((MONITORING / "loki/loki.yaml").read_text())
    blocks = _alloy_blocks(ALLOY.read_text())
    port = loki["server"]["http_listen_port"]
    (url,) = re.findall(r'url\s*=\s*"([^"]+)"', blocks["loki.write.loki"])
    assert url == f"http://loki:{port}/loki/api/v1/push"
    assert loki["schema_config"]["configs"][0]["store"] == "tsdb"


# -- traces: OpenTelemetry Collector -> Tempo --------------------------------------------

COLLECTOR = MONITORING / "otel-collector/config.yaml"


def _pipeline_errors(config: dict[str, Any]) -> list[str]:
    """What the Collector would refuse at startup in ``config``'s service section
    (https://opentelemetry.io/docs/collector/configuration/#service): a pipeline naming
    an undeclared receiver/processor/exporter, an undeclared extension, a pipeline
    without receivers or exporters."""
    errors = []
    service = config.get("service") or {}
    for extension in service.get("extensions", []):
        if extension not in (config.get("extensions") or {}):
            errors.append(f"extension {extension}")
    for name, pipeline in (service.get("pipelines") or {}).items():
        for kind in ("receivers", "processors", "exporters"):
            declared = config.get(kind) or {}
            errors += [f"{name}: {kind} {c}" for c in pipeline.get(kind, []) if c not in declared]
        if not pipeline.get("receivers") or not pipeline.get("exporters"):
            errors.append(f"{name}: no receivers or exporters")
    return errors


def test_collector_receives_otlp_and_exports_to_tempo() -> None:
    """No collector binary here: the pipeline is well-formed, receives OTLP/HTTP on the
    port authz's overlay endpoint names (authz exports HTTP/protobuf only) and exports
    to Tempo's OTLP/gRPC receiver."""
    config = yaml.safe_load(COLLECTOR.read_text())
    assert _pipeline_errors(config) == []
    (pipeline,) = config["service"]["pipelines"].items()
    assert pipeline[0] == "traces"
    assert pipeline[1]["processors"][0] == "memory_limiter"  # first, as the docs require
    http = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    overlay = yaml.safe_load((ROOT / "infra/compose/docker-compose.monitoring.yaml").read_text())
    environment = overlay["services"]["authz"]["environment"]
    assert environment["OTEL_TRACES_EXPORTER"] == "otlp"
    assert environment["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(":" + http.rpartition(":")[2])
    tempo = yaml.safe_load((MONITORING / "tempo/tempo.yaml").read_text())
    grpc = tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    (exporter,) = [config["exporters"][e] for e in pipeline[1]["exporters"]]
    assert exporter["endpoint"] == "tempo:" + grpc.rpartition(":")[2]
    datasources = yaml.safe_load(
        (MONITORING / "grafana/provisioning/datasources/datasources.yaml").read_text()
    )["datasources"]
    (source,) = [d for d in datasources if d["type"] == "tempo"]
    assert source["url"] == f"http://tempo:{tempo['server']['http_listen_port']}"


BROKEN_PIPELINES = {
    "undeclared exporter": ("exporters: [otlp_grpc/tempo]", "exporters: [otlp_grpc/jaeger]"),
    "undeclared processor": ("processors: [memory_limiter, batch]", "processors: [batching]"),
    "no receivers": ("receivers: [otlp]", "receivers: []"),
    "undeclared extension": ("extensions: [health_check]", "extensions: [pprof]"),
}


@pytest.mark.parametrize("change", BROKEN_PIPELINES.values(), ids=BROKEN_PIPELINES.keys())
def test_collector_check_catches_a_broken_pipeline(change: tuple[str, str]) -> None:
    old, new = change
    text = COLLECTOR.read_text()
    assert old in text
    assert _pipeline_errors(yaml.safe_load(text.replace(old, new, 1)))
