"""
proxyframe: a pluggable HTTP/1.1 forward proxy and CONNECT tunnel on Twisted.

Run it with ``twistd -n proxyframe [--config FILE] [--listen ENDPOINT]``, or
embed it in a Twisted program::

    endpoint.listen(ProxyFactory(load_config("proxyframe.toml")))
"""

from proxyframe.config import Config, ConfigError, load_config
from proxyframe.protocol.server import ProxyFactory

__all__ = ["Config", "ConfigError", "ProxyFactory", "load_config", "__version__"]

__version__ = "0.1.0"
