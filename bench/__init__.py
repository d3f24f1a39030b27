"""Benchmark harness for ``scripts/bench``: Envoy alone vs Envoy + opa-envoy-plugin vs
Envoy + authz + OPA, side by side in one run (issue 7).

The data flow, file by file: ``workload`` (API keys, bundle data, Zipf and distinct key
sequences, vegeta targets) -> ``rig`` (the processes of each setup on 127.0.0.1) ->
``load`` (vegeta at a constant rate, results parsed into a ``stats.Step``) -> ``search``
(max sustained rate) -> ``procstat`` (CPU and peak RSS of each process) -> ``report``
(table, ratios, JSON, plot) -> ``profile`` (py-spy samples of authz, summarized).
``run`` orchestrates; ``__main__`` parses arguments.
"""
