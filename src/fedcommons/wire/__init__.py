"""The wire format shared by the client SDK and the coordinator.

Flower-free on purpose: the client SDK encodes, the coordinator decodes, strategies
consume decoded :class:`ClientUpdate` objects, and none of them imports the other.
"""

from fedcommons.wire import keys
from fedcommons.wire.manifest import MANIFEST_SCHEMA_VERSION, ReleaseManifest
from fedcommons.wire.update import ClientUpdate, decode_dense_delta, decode_mask

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "ClientUpdate",
    "ReleaseManifest",
    "decode_dense_delta",
    "decode_mask",
    "keys",
]
