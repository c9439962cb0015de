"""What the tests share, once each: waits, free ports, reading /metrics, the exporter in a
thread or a subprocess, proxies, the end-to-end stack, the system tools they need."""
