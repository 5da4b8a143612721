"""The suite, laid out by kind (``trial tests`` runs them all):

- ``tests.pure``: pure functions, no reactor (configuration, routes, headers,
  policy, schemas, file parsing, docs anchors).
- ``tests.memory``: real components on ``MemoryReactorClock`` and
  ``StringTransport`` (the data plane, sending, the drain, hypothesis).
- ``tests.loopback``: the real reactor, sockets on 127.0.0.1 (proxy, upstream
  and client in this process).
- ``tests.process``: ``twistd lgmt-proxy`` spawned as a child process.
- ``tests.e2e``: real peers (Prometheus, Loki clients, OTLP exporters...).
- ``tests.support``: shared helpers, no tests.
"""
