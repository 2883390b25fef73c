"""
The plugin contract: what a filter plugin provides and what the proxy
promises it.

A *filter factory* (:class:`IFilterFactory`) is what
``twisted.plugin.getPlugins`` finds in the :mod:`proxyframe.plugins`
package; the config names it (``[[filter]] use = "acl"``) and the proxy
calls its :meth:`~IFilterFactory.build` once, at start, with that entry's
options.  The *filter* it returns (:class:`IFilter`) is called for every
exchange, in config order for the request phase and in reverse order for
the response phase, like middleware.

A filter implements any subset of the hooks: subclass
:class:`proxyframe.filters.Filter`, whose hooks do nothing, and override
the ones you need; the chain calls only the overridden ones, so a hook you
leave out costs nothing.

Every hook runs on the reactor thread and must not block it: no
``time.sleep``, no synchronous DNS, disk, database or password hashing.
Return a ``Deferred`` (``deferToThread`` for blocking work) or write the
hook as ``async def``; a plain return value costs no Deferred.
"""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import Attribute, Interface

__all__ = ["IFilterFactory", "IFilter"]


class IFilterFactory(IPlugin):
    """
    A filter plugin: found by ``getPlugins(IFilterFactory,
    proxyframe.plugins)``.  Plugins are provider objects (instances), one
    per module-level name, in modules with unique names.
    """

    name = Attribute(
        """
        The name the config uses: ``[[filter]] use = "<name>"`` (``str``;
        letters, digits, ``-`` and ``_``; unique among installed plugins).
        """
    )

    description = Attribute("One line saying what the filter does (``str``), for ``--list-filters``.")

    def build(options, context):
        """
        Make the filter for one ``[[filter]]`` entry of the config.

        Called once at start, before the proxy listens.  Parse and check
        every option here (fail loudly, keep the hot path thin), open the
        files the filter needs, but do not start long work.

        :param options: the entry's keys except ``use`` (``dict[str,
            object]`` as parsed from TOML: ``str``, ``int``, ``float``,
            ``bool``, lists and tables).
        :param context: a :class:`proxyframe.filters.FilterContext`: the
            reactor, the whole config, the directory relative paths are
            resolved against, and the entry's position.
        :returns: an :class:`IFilter` provider.
        :raises proxyframe.config.ConfigError: for an unknown option or a
            bad value; the message names the option.  The proxy then does
            not start, and prints the filter's name with the message.
        """


class IFilter(Interface):
    """
    One filter in the chain.  All hooks receive the
    :class:`proxyframe.exchange.Exchange`; they may read everything on it,
    change the request before it is forwarded and the response before it
    is sent, and leave values for later filters in ``exchange.notes``.

    A hook that raises fails only that exchange: the client gets 500 with
    ``Proxy-Status: ...; error=proxy_internal_error``, the failure is
    logged with the filter's name, and the proxy carries on.
    """

    def request_received(exchange):
        """
        A request head arrived (any method but CONNECT), before anything is
        sent upstream.  Runs in config order.

        May change ``exchange.request`` (headers, target fields
        ``host``/``port``/``path``), set ``exchange.user``, or answer at
        once by returning a :class:`proxyframe.exchange.Response` (made with
        ``Response.make``): later filters and the origin server are then
        skipped, while the filters already passed still see
        :meth:`response_received` and :meth:`exchange_done`.

        :returns: ``None`` to go on, a ``Response`` to answer now, or a
            ``Deferred`` (or coroutine) firing with either.  While it waits,
            the client's request body is not read.
        """

    def connect_requested(exchange):
        """
        A CONNECT request arrived (RFC 9110 §9.3.6): ``exchange.request``
        has ``host`` and ``port``.  Same contract as
        :meth:`request_received`; return a ``Response`` (e.g. 403 or 407)
        to refuse the tunnel.  The tunnel's bytes are never shown to
        filters.
        """

    def response_received(exchange):
        """
        The response head is known: ``exchange.response`` came from the
        origin server, or from an earlier short-circuit or error.  Runs in
        reverse config order, only for filters whose request hook ran.

        May change ``exchange.response`` (status, headers).  A filter that
        changes the body's length in :meth:`response_body` must remove
        ``Content-Length`` here; the proxy then frames the body itself.

        :returns: ``None``, a replacement ``Response`` (the origin's body is
            then dropped), or a ``Deferred``/coroutine of either.  While it
            waits, the origin is not read.
        """

    def response_body(exchange, data):
        """
        A piece of the response body (``bytes``, decoded from any transfer
        coding), in reverse config order.  Synchronous only: it is on the
        hot path, called for every piece.

        :returns: the bytes to pass on (``data`` itself to leave it alone;
            ``b""`` to drop the piece).
        """

    def exchange_done(exchange):
        """
        The exchange is over: the last byte was sent, or it failed
        (``exchange.error`` then holds the RFC 9209 error type, or
        ``"client_closed"``).  Called once per exchange for every filter,
        in reverse config order, even when the request phase never reached
        it (a malformed request answered 400, an earlier filter's answer),
        so that logs and metrics see every exchange; ``exchange.request``
        is ``None`` when the request head could not be parsed.  Its return
        value is ignored, and an exception is only logged.
        """
