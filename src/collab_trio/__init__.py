"""collab-trio: a real-time collaboration server for Optiverse, on trio."""

__version__ = "0.1.0"

from .config import ServerConfig  # noqa: E402
from .server import CollabServer, serve  # noqa: E402

__all__ = ["CollabServer", "ServerConfig", "__version__", "serve"]
