"""Flower engines and the coordinator service glue.

Flower's simulation engine and the in-process test engine, the deployment engine's
SuperLink service, run submission and scheduling, certificates and node keys.
"""
