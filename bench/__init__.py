"""The side-by-side benchmark of tlsproxy against nginx (issue 7): ``python -m bench.run``.

Modules: ``nginx`` (config templates), ``procs`` (start/stop/pin/measure the processes we start),
``load`` (wrk, h2load, curl, openssl s_client wrappers and their pure output parsers), ``idle``
(a bounded client that holds N handshaken TLS connections), ``report`` (medians, ratios, the
table and the docs/performance.md entry), ``run`` (the orchestration). See docs/performance.md.
"""
