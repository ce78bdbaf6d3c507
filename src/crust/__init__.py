"""crust: reliable, encrypted, authenticated peer-to-peer connections with NAT traversal."""

from crust import ca, errors, events
from crust.config import Config
from crust.contact import Contact
from crust.identity import Identity, PeerId
from crust.service import Service
from crust.types import ConnectionDetails, EndpointPair, Statistics

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConnectionDetails",
    "Contact",
    "EndpointPair",
    "Identity",
    "PeerId",
    "Service",
    "Statistics",
    "__version__",
    "ca",
    "errors",
    "events",
]
