"""The coordinator: Flower ServerApp, round loop, release registry, simulation runner."""
