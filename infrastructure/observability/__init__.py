"""Seeing daybook converge: Prometheus metrics, OpenTelemetry traces, structured logs."""
