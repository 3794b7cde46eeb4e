"""The round engine.

The Flower ServerApp, the run and its rounds (plaintext and secure), reply intake,
sampling, durable commits and crash recovery, and publishing the candidate.
"""
