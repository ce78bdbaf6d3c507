"""crust: reliable, encrypted, authenticated peer-to-peer connections with NAT traversal."""

from crust import ca, errors, events
from crust.config import Config
from crust.contact import Contact
from crust.identity import Identity, PeerId
from crust.proto.punch import ConnectionInfo, PublicConnectionInfo
from crust.service import Service
from crust.types import ConnectionDetails, EndpointPair, Statistics

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConnectionDetails",
    "ConnectionInfo",
    "Contact",
    "EndpointPair",
    "Identity",
    "PeerId",
    "PublicConnectionInfo",
    "Service",
    "Statistics",
    "__version__",
    "ca",
    "errors",
    "events",
]
