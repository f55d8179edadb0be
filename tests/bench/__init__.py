"""``make bench``: the gateway's latency, throughput, resources and saturation behaviour.

Run with ``python -m tests.bench`` (``--help`` for options). It starts simulated upstreams and
gateway processes on the loopback, pinned apart with ``taskset``, drives them from a separate
load-generator process, prints one table and writes ``var/bench/latest.json``.

Modules: ``runner`` (phases), ``stack`` (database, simulators, gateway processes), ``seed``
(configuration, run as a child), ``loadgen`` (the generator process) and ``driver`` (running it),
``wrk`` (optional cross-check), ``scenarios`` and ``saturation`` (what is measured),
``profiling``/``profiled`` (where the time goes), ``transports`` (the upstream HTTP clients
compared: ``python -m tests.bench transports``), ``procs`` (processes and /proc),
``stats`` and ``report``. Nothing here is named ``test_*``: pytest does not collect it.
"""
