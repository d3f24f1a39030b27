"""Turn a run's results (the JSON document ``bench.run`` saves) into text and a plot.

The results document, as far as this module reads it::

    {"setups": {"<setup>": {
        "fixed": {"<rate>": {"step": Step.to_json(), "cpu_per_1k": {role: s}}},
        "search": {"skewed": {"max_rps": int | None, ...}, "distinct": {...}},
        "workloads": {"<workload>": {"fixed": {"<rate>": {...}},
                                     "cache": {"hits", "misses", "hit_rate"} | None}},
        "memory": {role: {"rss_kb", "hwm_kb"}}}},
     "scale": {"<setup>": {"<keys>": {"step": Step.to_json(), "memory": {...}}}},
     "hostile": {"quiet": {"step": ...}, "loaded": {"step": ...}, "hostile": Step.to_json(),
                 "legit_rate", "hostile_rate", "slow": {...}}}

``fixed`` is the skewed workload's (older results have no ``workloads``). Missing parts
(a setup skipped or failed) print as ``n/a``; ratios need both sides.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from bench.hostile import format_hostile, hostile_ratios

__all__ = [
    "RATIO_NAMES",
    "cpu_at_max",
    "fmt_ms",
    "fmt_ratio",
    "format_ratios",
    "format_scale_table",
    "format_setup_table",
    "format_table",
    "format_workload_ratios",
    "format_workload_table",
    "noisy_steps",
    "plot",
    "ratios",
    "workload_ratios",
]

NA: Final = "n/a"
# The three headline ratios, in the order of the final line.
RATIO_NAMES: Final = (
    "authz/peer throughput",
    "authz/peer p99 at 1000 rps",
    "authz/limit throughput",
)
DECIDER_ROLES: Final = ("authz", "opa", "peer", "ceiling")
WORKLOAD_ORDER: Final = ("skewed", "realistic", "distinct")
# The setups compared against the peer and the ceiling in the per-workload ratios.
AUTHZ_ROWS: Final = ("authz", "authz-bare")
PLOT_PERCENTILES: Final = ("p50", "p90", "p99", "p99.9")
# The parts of a results document that hold load steps.
_STEP_SECTIONS: Final = ("setups", "scale", "profile", "hostile")


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, Mapping) or key not in data:
            return None
        data = data[key]
    return data


def fmt_ms(value: float | None) -> str:
    """Milliseconds with precision that suits the magnitude (``0.412``, ``3.41``,
    ``41.2``, ``412``); ``n/a`` for None."""
    if value is None:
        return NA
    if value < 1:
        return f"{value:.3f}"
    if value < 10:
        return f"{value:.2f}"
    if value < 100:
        return f"{value:.1f}"
    return f"{value:.0f}"


def fmt_ratio(value: float | None) -> str:
    """A ratio with two decimals; ``n/a`` for None."""
    return NA if value is None else f"{value:.2f}"


def _fmt_int(value: float | None) -> str:
    return NA if value is None else f"{value:,.0f}"


def _fmt_max(search: Any) -> str:
    """A search's max sustained rps; ``>=`` when no failed step bounds it from above
    (the search ran out of steps still going up); ``<`` the lowest rate tried when no
    step sustained."""
    best = _get(search, "max_rps")
    tried = [s["rate"] for s in _get(search, "steps") or [] if isinstance(s, Mapping)]
    if best is None and tried:
        return f"<{_fmt_int(min(tried))}"
    text = _fmt_int(best)
    return f">={text}" if best is not None and _get(search, "ceiling_measured") is False else text


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: columns padded to their widest cell, joined by `` | ``, the
    first column left-aligned and the others right-aligned, a rule under the header."""
    widths = [len(h) for h in headers]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, expected {len(headers)}: {row!r}")
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return " | ".join([first, *rest]).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def _latencies(step: Any) -> str:
    lat = _get(step, "latency_ms") or {}
    errors = _get(step, "errors")
    text = " / ".join(fmt_ms(lat.get(p)) for p in ("p50", "p99", "p99.9"))
    return f"{text} ({errors} err)" if errors else text


def _memory(memory: Any, roles: Sequence[str], key: str = "hwm_kb") -> str:
    parts = [
        f"{role} {memory[role][key] / 1024:.0f}"
        for role in roles
        if isinstance(memory, Mapping) and _get(memory, role, key) is not None
    ]
    return ", ".join(parts) if parts else NA


def cpu_at_max(setup: Mapping[str, Any], workload: str = "skewed") -> dict[str, float] | None:
    """CPU ms per request of each process of ``setup`` in its search step at the max
    sustained rate (a loaded, healthy setup: per-request costs at low rates carry idle
    overheads, and at overload they measure the failure path); None without one."""
    search = _get(setup, "search", workload) or {}
    best = search.get("max_rps")
    for step in search.get("steps", []):
        if step.get("rate") == best and step.get("sustained"):
            cpu: dict[str, float] = step.get("cpu_per_1k") or {}
            return cpu
    return None


def _fmt_percent(value: float | None) -> str:
    return NA if value is None else f"{value:.0%}"


def _workloads(results: Mapping[str, Any]) -> list[str]:
    """The workloads present in ``results``, in :data:`WORKLOAD_ORDER` (others after)."""
    found: list[str] = []
    for setup in (results.get("setups") or {}).values():
        for name in [*(_get(setup, "search") or {}), *(_get(setup, "workloads") or {})]:
            if name not in found:
                found.append(name)
    return sorted(found, key=lambda w: (*WORKLOAD_ORDER, w).index(w))


def _fixed_step(setup: Any, workload: str, rate: int) -> Any:
    step = _get(setup, "workloads", workload, "fixed", str(rate))
    if step is None and workload == "skewed":
        step = _get(setup, "fixed", str(rate))
    return step


def _max_rps(setups: Mapping[str, Any], setup: str, workload: str) -> float | None:
    value = _get(setups, setup, "search", workload, "max_rps")
    return float(value) if value is not None else None


def _ceiling_rps(setups: Mapping[str, Any], workload: str) -> float | None:
    """The ceiling's max sustained rps on ``workload``; on ``distinct`` without a distinct
    run its skewed one (the null server never reads the key, and distinct requests have
    the skewed requests' shape)."""
    value = _max_rps(setups, "ceiling", workload)
    if value is None and workload == "distinct":
        value = _max_rps(setups, "ceiling", "skewed")
    return value


def _decider_cpu(setup: Any, workload: str) -> float | None:
    cpu = cpu_at_max(setup or {}, workload)
    if not cpu:
        return None
    decider = [cpu[r] for r in DECIDER_ROLES if r in cpu]
    return sum(decider) if decider else None


def hit_rate(setup: Any, workload: str) -> float | None:
    """authz's decision-cache hit rate over the measured steps of ``workload`` (None
    without cache readings, e.g. a setup without authz)."""
    value = _get(setup, "workloads", workload, "cache", "hit_rate")
    return float(value) if value is not None else None


def format_workload_table(results: Mapping[str, Any], rates: Sequence[int]) -> str:
    """One row per (workload, setup): max sustained rps, p50/p99 ms at each fixed rate,
    CPU ms per request at the max (decider + Envoy), authz's cache hit rate, and the
    row's max rps over the peer's and over the ceiling's on the same workload."""
    setups = results.get("setups") or {}
    headers = [
        "workload",
        "setup",
        "max rps",
        *(f"p50/p99 ms @{r}" for r in rates),
        "CPU ms/req: decider + envoy",
        "hit rate",
        "/peer",
        "/ceiling",
    ]
    rows = []
    for workload in _workloads(results):
        for name, setup in setups.items():
            search = _get(setup, "search", workload)
            if search is None and _get(setup, "workloads", workload) is None:
                continue
            cpu = cpu_at_max(setup, workload)
            decider = _decider_cpu(setup, workload)
            cpu_text = (
                NA
                if cpu is None
                else f"{fmt_ms(decider) if decider is not None else '-'} + "
                f"{fmt_ms(cpu.get('envoy'))}"
            )
            best = _max_rps(setups, name, workload)
            lat = []
            for rate in rates:
                step = _get(_fixed_step(setup, workload, rate), "step")
                values = _get(step, "latency_ms") or {}
                text = f"{fmt_ms(values.get('p50'))} / {fmt_ms(values.get('p99'))}"
                errors = _get(step, "errors")
                lat.append(f"{text} ({errors} err)" if errors else text)
            rows.append(
                [
                    workload,
                    name,
                    _fmt_max(search),
                    *lat,
                    cpu_text,
                    _fmt_percent(hit_rate(setup, workload)),
                    fmt_ratio(_div(best, _max_rps(setups, "peer", workload))),
                    fmt_ratio(_div(best, _ceiling_rps(setups, workload))),
                ]
            )
    return format_table(headers, rows)


def workload_ratios(results: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per workload, the ratios of each authz setup (:data:`AUTHZ_ROWS`) present:
    ``<s>/peer throughput``, ``<s>/ceiling throughput``, ``<s>/peer p99 at 1000 rps``,
    ``<s>/peer decider CPU per request`` (authz + OPA over the plugin, at each one's max),
    ``<s> hit rate``; and ``peer/ceiling throughput``, and on a workload both authz setups
    ran, ``authz/authz-bare throughput`` (the decision log's and audit trail's cost)."""
    setups = results.get("setups") or {}

    def p99_1000(name: str, workload: str) -> float | None:
        step = _fixed_step(setups.get(name), workload, 1000)
        value = _get(step, "step", "latency_ms", "p99")
        return float(value) if value is not None else None

    out: dict[str, dict[str, float | None]] = {}
    for workload in _workloads(results):
        values: dict[str, float | None] = {}
        peer, ceiling = _max_rps(setups, "peer", workload), _ceiling_rps(setups, workload)
        for name in AUTHZ_ROWS:
            if _get(setups, name, "search", workload) is None:
                continue
            best = _max_rps(setups, name, workload)
            values[f"{name}/peer throughput"] = _div(best, peer)
            values[f"{name}/ceiling throughput"] = _div(best, ceiling)
            values[f"{name}/peer p99 at 1000 rps"] = _div(
                p99_1000(name, workload), p99_1000("peer", workload)
            )
            values[f"{name}/peer decider CPU per request"] = _div(
                _decider_cpu(setups.get(name), workload),
                _decider_cpu(setups.get("peer"), workload),
            )
            values[f"{name} hit rate"] = hit_rate(setups.get(name), workload)
        values["peer/ceiling throughput"] = _div(peer, ceiling)
        if all(_get(setups, n, "search", workload) is not None for n in AUTHZ_ROWS):
            values["authz/authz-bare throughput"] = _div(
                _max_rps(setups, "authz", workload), _max_rps(setups, "authz-bare", workload)
            )
        out[workload] = values
    return out


def format_workload_ratios(values: Mapping[str, Mapping[str, float | None]]) -> str:
    """One line per workload: ``<workload>: name value | ...`` (hit rates in percent)."""
    lines = []
    for workload, named in values.items():
        parts = [
            f"{name} {_fmt_percent(v) if name.endswith('hit rate') else fmt_ratio(v)}"
            for name, v in named.items()
        ]
        lines.append(f"{workload}: " + " | ".join(parts))
    return "\n".join(lines)


def format_setup_table(results: Mapping[str, Any], rates: Sequence[int]) -> str:
    """Per setup: max sustained rps (skewed and distinct keys), p50/p99/p99.9 at each
    fixed rate, CPU ms per request of the decider (authz + OPA, or the plugin) and of
    Envoy at the max sustained rate, peak RSS."""
    headers = [
        "setup",
        "max rps",
        "max rps distinct",
        *(f"p50/p99/p99.9 ms @{r}" for r in rates),
        "CPU ms/req @max: decider + envoy",
        "peak RSS MB",
    ]
    rows = []
    for name, setup in (results.get("setups") or {}).items():
        fixed = _get(setup, "fixed")
        cpu = cpu_at_max(setup)
        if cpu is None:
            cpu_text = NA
        else:
            decider = [cpu[r] for r in DECIDER_ROLES if r in cpu]
            cpu_text = f"{fmt_ms(sum(decider)) if decider else '-'} + {fmt_ms(cpu.get('envoy'))}"
        rows.append(
            [
                name,
                _fmt_max(_get(setup, "search", "skewed")),
                _fmt_max(_get(setup, "search", "distinct")),
                *(_latencies(_get(fixed, str(r), "step")) for r in rates),
                cpu_text,
                _memory(_get(setup, "memory"), (*DECIDER_ROLES, "envoy")),
            ]
        )
    return format_table(headers, rows)


def format_scale_table(results: Mapping[str, Any]) -> str:
    """Per bundle size: each decider's p50/p99 and its processes' resident memory."""
    scale = results.get("scale") or {}
    setups = list(scale)
    sizes = sorted({int(size) for per in scale.values() for size in per})
    headers = [
        "keys",
        *(f"{s} p50/p99 ms" for s in setups),
        *(f"{s} RSS MB" for s in setups),
    ]
    rows = []
    for size in sizes:
        entries = [_get(scale, s, str(size)) for s in setups]
        lat = []
        for entry in entries:
            step_lat = _get(entry, "step", "latency_ms") or {}
            lat.append(f"{fmt_ms(step_lat.get('p50'))} / {fmt_ms(step_lat.get('p99'))}")
        mem = [_memory(_get(e, "memory"), DECIDER_ROLES, "rss_kb") for e in entries]
        rows.append([f"{size:,}", *lat, *mem])
    return format_table(headers, rows)


def _steps(node: Any) -> Iterator[Mapping[str, Any]]:
    """Every step record (a mapping with ``step`` and ``foreign_cpu_cores``) in a results
    document, depth first."""
    if isinstance(node, Mapping):
        if "step" in node and "foreign_cpu_cores" in node:
            yield node
        for value in node.values():
            yield from _steps(value)
    elif isinstance(node, list):
        for value in node:
            yield from _steps(value)


def noisy_steps(results: Mapping[str, Any], threshold: float) -> list[dict[str, Any]]:
    """Steps during which other processes on the machine used more than ``threshold``
    cores: ``[{"step": name, "foreign_cpu_cores": x}]``, worst first."""
    noisy = [
        {"step": rec["step"].get("name"), "foreign_cpu_cores": rec["foreign_cpu_cores"]}
        for rec in _steps({k: v for k, v in results.items() if k in _STEP_SECTIONS})
        if rec["foreign_cpu_cores"] > threshold
    ]
    return sorted(noisy, key=lambda item: -float(item["foreign_cpu_cores"]))


def ratios(results: Mapping[str, Any]) -> dict[str, float | None]:
    """The headline ratios (:data:`RATIO_NAMES`) and two more: ``distinct authz/peer
    throughput`` and ``authz p50 100k/100 keys`` (largest over smallest scale size)."""
    setups = results.get("setups") or {}

    def max_rps(name: str, workload: str = "skewed") -> float | None:
        value = _get(setups, name, "search", workload, "max_rps")
        return float(value) if value is not None else None

    def cpu_total(name: str) -> float | None:
        cpu = cpu_at_max(setups.get(name) or {})
        return sum(cpu.values()) if cpu else None

    def p99_1000(name: str) -> float | None:
        value = _get(setups, name, "fixed", "1000", "step", "latency_ms", "p99")
        return float(value) if value is not None else None

    out: dict[str, float | None] = {
        "authz/peer throughput": _div(max_rps("authz"), max_rps("peer")),
        "authz/peer p99 at 1000 rps": _div(p99_1000("authz"), p99_1000("peer")),
        "authz/limit throughput": _div(max_rps("authz"), max_rps("limit")),
        "distinct authz/peer throughput": _div(
            max_rps("authz", "distinct"), max_rps("peer", "distinct")
        ),
        # Requests per CPU-second of all the setup's processes (Envoy included), at each
        # one's max sustained rate: less sensitive to a busy neighbour than throughput.
        "authz/peer requests per CPU-second": _div(cpu_total("peer"), cpu_total("authz")),
    }
    if "ceiling" in setups:
        out["authz/ceiling throughput"] = _div(max_rps("authz"), max_rps("ceiling"))
    sizes = sorted(int(s) for s in _get(results, "scale", "authz") or {})
    if len(sizes) >= 2:
        p50 = [
            _get(results, "scale", "authz", str(s), "step", "latency_ms", "p50")
            for s in (sizes[-1], sizes[0])
        ]
        out[f"authz p50 {sizes[-1]:,}/{sizes[0]:,} keys"] = _div(p50[0], p50[1])
    if isinstance(results.get("hostile"), Mapping):
        out.update(_hostile_ratios(results["hostile"]))
    return out


def _hostile_ratios(hostile: Mapping[str, Any]) -> dict[str, float | None]:
    return hostile_ratios(_get(hostile, "quiet", "step"), _get(hostile, "loaded", "step"))


def format_ratios(values: Mapping[str, float | None], names: Sequence[str]) -> str:
    """``ratios: name value | name value ...`` for ``names`` in order."""
    return "ratios: " + " | ".join(f"{n} {fmt_ratio(values.get(n))}" for n in names)


def plot(results: Mapping[str, Any], rates: Sequence[int], path: Path) -> Path:
    """Save a PNG: latency percentiles per setup at each fixed rate (one panel per
    rate, log scale), and p50/p99 per bundle size (last panel). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = results.get("setups") or {}
    scale = results.get("scale") or {}
    panels = len(rates) + (1 if scale else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2), squeeze=False)
    # One colour per setup in every panel.
    colors = {
        name: f"C{i}" for i, name in enumerate([*setups, *(s for s in scale if s not in setups)])
    }
    for ax, rate in zip(axes[0], rates, strict=False):
        for name, setup in setups.items():
            lat = _get(setup, "fixed", str(rate), "step", "latency_ms") or {}
            points = [(p, lat[p]) for p in PLOT_PERCENTILES if p in lat]
            if points:
                ax.plot(
                    [p for p, _ in points],
                    [v for _, v in points],
                    marker="o",
                    label=name,
                    color=colors[name],
                )
        ax.set_yscale("log")
        ax.set_title(f"latency at {rate} rps (open loop)")
        ax.set_ylabel("ms")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if scale:
        ax = axes[0][-1]
        for name, per in scale.items():
            sizes = sorted(int(s) for s in per)
            for pct, style in (("p50", "-"), ("p99", "--")):
                values = [_get(per, str(s), "step", "latency_ms", pct) for s in sizes]
                ax.plot(sizes, values, style, marker="o", label=f"{name} {pct}", color=colors[name])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title("latency vs keys in bundle data")
        ax.set_xlabel("keys")
        ax.set_ylabel("ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.report RESULTS.json``: print a saved run's tables and ratios."""
    import json
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m bench.report build/bench/results-<stamp>.json", file=sys.stderr)
        return 2
    results = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    print(render(results))
    return 0


def render(results: Mapping[str, Any]) -> str:
    """The whole text report of ``results``: tables, warnings, errors and, as the last
    line, the headline ratios; a run of the hostile step only (``--only hostile``) ends
    with the hostile step's line instead."""
    hostile = results.get("hostile")
    hostile_line = format_hostile(hostile) if isinstance(hostile, Mapping) else None
    if not results.get("setups") and hostile_line is not None:
        failed = [f"FAILED {e['setup']}: {e['error']}" for e in results.get("errors", [])]
        return "hostile step:\n\n" + "\n".join([*failed, hostile_line])
    rates = [int(r) for r in (results.get("options") or {}).get("rates", [500, 1000])]
    parts = [
        "per workload (max rps: sustained; /peer, /ceiling: max rps over theirs):\n"
        + format_workload_table(results, rates),
        "per workload ratios:\n" + format_workload_ratios(workload_ratios(results)),
        "per setup (skewed workload; peak RSS):\n" + format_setup_table(results, rates),
    ]
    if results.get("scale"):
        parts.append(format_scale_table(results))
    lines: list[str] = []
    profile = results.get("profile")
    if profile:
        from bench.profile import format_profile

        parts.append(
            f"authz profile (py-spy, at {profile.get('rate')} rps):\n" + format_profile(profile)
        )
    noisy = results.get("noisy_steps") or []
    if noisy:
        worst = noisy[0]
        lines.append(
            f"WARNING: {len(noisy)} steps ran while other processes used more than 0.1 cores "
            f"(worst {worst['foreign_cpu_cores']:.2f} in {worst['step']}): the machine was "
            "not quiet; compare with care, or rerun with --wait-quiet"
        )
    lines += [f"FAILED {e['setup']}: {e['error']}" for e in results.get("errors", [])]
    values = ratios(results)
    overloaded = {
        name: _get(results, "setups", name, "fixed", "1000", "step", "errors")
        for name in ("peer", "authz")
    }
    if any(overloaded.values()):
        errors = ", ".join(f"{n} {e}" for n, e in overloaded.items() if e)
        lines.append(
            f"note: at 1000 rps some requests failed ({errors} errors): there p99 measures "
            "overload (Envoy's 500 ms ext_authz timeout), not decision latency"
        )
    if hostile_line is not None:
        lines.append(hostile_line)
    extra = [name for name in values if name not in RATIO_NAMES]
    lines.append(format_ratios(values, extra).replace("ratios:", "more ratios:"))
    lines.append(format_ratios(values, RATIO_NAMES))
    return "\n\n".join(parts) + "\n\n" + "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
