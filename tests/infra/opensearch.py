"""OpenSearch-compatible server (osmem-server) for the test session."""
