"""fedcommons: build models the way open-source software is built.

Parts (see ``docs/architecture.md``):

- :mod:`fedcommons.wire` — the wire format shared by clients and coordinator;
- :mod:`fedcommons.tasks` — the ``Task`` interface and the built-in ``digits`` task;
- :mod:`fedcommons.client_sdk` — what an institution runs (Flower ``ClientApp``);
- :mod:`fedcommons.strategies` — aggregators: plain tensors in, tensors out, no Flower;
- :mod:`fedcommons.privacy` — differential privacy and secure aggregation;
- :mod:`fedcommons.coordinator` — the Flower ``ServerApp``, the release registry, the CLI.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedcommons")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
