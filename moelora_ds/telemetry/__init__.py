"""Telemetry: metrics, progress bars, expert health and routing reports."""
