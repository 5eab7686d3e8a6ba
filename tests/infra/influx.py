"""InfluxDB 1.x and VictoriaMetrics servers for the test session (see the fixtures below)."""
