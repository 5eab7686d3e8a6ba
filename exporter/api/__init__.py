"""HTTP API: cAdvisor-compatible REST endpoints, Prometheus metrics, auth. Handlers read the
cache and the registry (through :class:`~exporter.api.context.ApiContext`), never cgroups."""
