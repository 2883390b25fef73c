"""
The ``twistd proxyframe`` plugin.  Twisted imports this file while listing
plugins, so it only names the module that does the work.
"""

from twisted.application.service import ServiceMaker

proxyframe = ServiceMaker(
    "proxyframe",
    "proxyframe.service",
    "A pluggable HTTP/1.1 forward proxy and CONNECT tunnel",
    "proxyframe",
)
