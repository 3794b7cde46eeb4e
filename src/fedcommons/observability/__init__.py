"""What the coordinator tells its operator.

Prometheus metrics, the audit log, and the round engine's event hooks that feed both.
"""
