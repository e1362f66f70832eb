"""Monitoring: API request logs, metrics, alert rules and alerts."""
