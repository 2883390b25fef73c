from twisted.plugin import IPlugin
from zope.interface import implementer

from proxyframe.exchange import Response
from proxyframe.filters import Filter
from proxyframe.interfaces import IFilterFactory


class NoDelete(Filter):
    def request_received(self, exchange):
        if exchange.request.method == b"DELETE":
            return Response.make(405, "DELETE is not allowed through this proxy\n")


@implementer(IPlugin, IFilterFactory)
class NoDeleteFactory:
    name = "no-delete"
    description = "Refuse DELETE requests with 405"

    def build(self, options, context):
        return NoDelete()


no_delete = NoDeleteFactory()
