"""
The filter chain: finding the plugins, building the configured filters
once, and running their hooks for each exchange.

Hooks run in a plain loop; only a hook that returns a ``Deferred`` (or a
coroutine) makes the loop wait, so an all-synchronous chain costs no
Deferred.  Which filters implement which hook is worked out once, when the
chain is built: a filter that implements no hook costs nothing per request.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from twisted import plugin as twisted_plugin
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.plugin import getCache, getPlugins
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from proxyframe import plugins as plugin_package
from proxyframe.config import Config, ConfigError
from proxyframe.exchange import Exchange, Response
from proxyframe.filters import HOOKS, Filter, FilterContext
from proxyframe.interfaces import IFilter, IFilterFactory

__all__ = ["Chain", "build_chain", "find_filter_factories"]

_log = Logger()

#: (position in the config, filter name, bound hook)
Hook = tuple[int, str, Callable]


def _add_plugin_paths(config: Config) -> None:
    base = Path(config.source).parent if config.source else Path.cwd()
    for entry in config.plugin_paths:
        path = str((base / entry).resolve())
        if not os.path.isdir(path):
            raise ConfigError(f"{config.source or 'config'}: plugin_paths: {entry!r} is not a directory")
        if path not in plugin_package.__path__:
            plugin_package.__path__.append(path)


def find_filter_factories(config: Config, problems: list[str] | None = None,
                          wanted: Collection[str] | None = None) -> dict[str, IFilterFactory]:
    """
    Find the filter plugins: first-party, installed third-party, and the
    ``.py`` files in the config's ``plugin_paths``.  A module that fails to
    import does not hide the others; it is reported in one line naming
    the module, the error, and the file and line where it was raised
    (:func:`_load_problem`).

    :param problems: when given, those lines are appended to it (for the
        caller to show); otherwise each is logged as an error.
    :param wanted: the filter names the caller needs, or ``None`` for all.
        Then only the modules whose factory is bound to a module-level
        name like its filter name are imported (Twisted's plugin cache
        knows those names without importing anything); when a wanted
        filter is not found that way, every plugin module is imported, as
        for ``None``.  An unused plugin module costs nothing: the
        first-party ones would add about 7 MiB to every process.
    :returns: ``{name: factory}``, with at least the *wanted* ones found.
    :raises ConfigError: a ``plugin_paths`` entry is not a directory, or two
        plugins share a name.
    """
    _add_plugin_paths(config)
    found: dict[str, IFilterFactory] = {}
    with _load_failures_kept() as failures:
        factories = None if wanted is None else _load_by_name(set(wanted), failures)
        if factories is None:
            factories = list(getPlugins(IFilterFactory, plugin_package))
    lines = [_load_problem(failure, why) for failure, why in failures]
    if problems is None:
        for line in lines:
            _log.error("{problem}", problem=line)
    else:
        problems.extend(lines)
    for factory in factories:
        name = factory.name
        if name in found and found[name] is not factory:
            raise ConfigError(f"two filter plugins are named {name!r}: "
                              f"{plugin_origin(found[name])} and {plugin_origin(factory)}")
        found[name] = factory
    return found


def _load_by_name(wanted: set[str], failures: list) -> list[IFilterFactory] | None:
    """
    Import only the filter plugins bound to a module-level name that is a
    *wanted* filter name with ``-`` written ``_`` (as ``cache =
    CacheFactory()`` in ``pf_cache``, ``no_delete`` for ``no-delete``).

    :returns: those factories, or ``None`` when some wanted filter is not
        among them (a plugin may bind its factory to another name).
    """
    names = {name.replace("-", "_") for name in wanted}
    factories = []
    for dropin in getCache(plugin_package).values():
        for plugin in dropin.plugins:
            if plugin.name in names and any(i.isOrExtends(IFilterFactory) for i in plugin.provided):
                try:
                    factories.append(plugin.load())
                except Exception:
                    failures.append((Failure(), None))
    if not wanted <= {factory.name for factory in factories}:
        return None
    return factories


class _KeepErrors:
    """
    Stands in for ``twisted.python.log`` in :mod:`twisted.plugin` while
    ``getPlugins`` runs: its ``err`` keeps the failure instead of logging
    it, everything else is the real module's.
    """

    def __init__(self) -> None:
        self.failures: list[tuple[Failure, str | None]] = []

    def err(self, _stuff=None, _why=None, **kw) -> None:
        self.failures.append((_stuff if isinstance(_stuff, Failure) else Failure(), _why))

    def __getattr__(self, name: str):
        return getattr(legacy_log, name)


@contextmanager
def _load_failures_kept() -> Iterator[list[tuple[Failure, str | None]]]:
    """
    Keep what ``getPlugins`` reports with ``log.err`` (a module that fails
    to import, while it refreshes its cache), as ``(failure, why)`` pairs.

    ``getPlugins`` would log each as a critical "Unhandled Error" with a
    traceback, which twistd shows twice: before logging starts, Twisted
    prints critical events on stderr at once and also keeps them, then
    replays them into the log when twistd starts logging.
    """
    keeper = _KeepErrors()
    original, twisted_plugin.log = twisted_plugin.log, keeper
    try:
        yield keeper.failures
    finally:
        twisted_plugin.log = original


def _load_problem(failure: Failure, why: str | None = None) -> str:
    """
    One line for a failure ``getPlugins`` reported: ``filter plugin module
    pf_x could not be loaded: SyntaxError: invalid syntax (/path/pf_x.py,
    line 3)``.  The module is the one whose import raised (the outermost
    module-level frame, or the file of a ``SyntaxError`` in the plugin
    itself); the place is where the error was raised.
    """
    error = failure.value
    module = where = None
    tb = failure.getTracebackObject()
    while tb is not None:
        frame = tb.tb_frame
        if module is None and frame.f_code.co_name == "<module>":
            module = frame.f_globals.get("__name__")
        if not frame.f_code.co_filename.startswith("<"):
            where = (frame.f_code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    if isinstance(error, SyntaxError):
        if module is None and error.filename:
            module = Path(error.filename).stem
        text = f"{type(error).__name__}: {error.msg}"
        where = (error.filename, error.lineno) if error.filename else where
    else:
        text = f"{type(error).__name__}: {error}"
    if where is not None:
        text += f" ({where[0]}, line {where[1]})"
    if module is None:
        return f"filter plugin discovery failed{f' ({why})' if why else ''}: {text}"
    return f"filter plugin module {module.rpartition('.')[2]} could not be loaded: {text}"


def plugin_origin(factory: object) -> str:
    """:returns: the file a plugin object was defined in (for messages)."""
    module = sys.modules.get(type(factory).__module__)
    return getattr(module, "__file__", None) or type(factory).__module__


def build_chain(config: Config, reactor) -> Chain:
    """
    Build the configured filters, in order.

    :raises ConfigError: a filter named in the config was not found (the
        message lists the ones that were), or its ``build`` refused its
        options; the message starts with the filter's name and position.
    """
    if not config.filters:
        return Chain([])
    problems: list[str] = []
    factories = find_filter_factories(config, problems, {entry.use for entry in config.filters})
    base = Path(config.source).parent if config.source else Path.cwd()
    where = f"{config.source}: " if config.source else ""
    built = []
    for position, entry in enumerate(config.filters):
        factory = factories.get(entry.use)
        if factory is None:
            unloaded = "".join(f"; {line}" for line in problems)
            raise ConfigError(f"{where}filter[{position}]: no filter plugin named {entry.use!r} "
                              f"(found: {', '.join(sorted(factories)) or 'none'}){unloaded}")
        context = FilterContext(reactor, config, base, position)
        try:
            filter_ = factory.build(dict(entry.options), context)
        except ConfigError as e:
            raise ConfigError(f"{where}filter[{position}] ({entry.use}): {e}") from None
        verifyObject(IFilter, filter_)
        built.append((entry.use, filter_))
    for line in problems:
        # An error, not critical: twistd shows it once, in its log.
        _log.error("{problem}", problem=line)
    return Chain(built)


def _implemented(filter_: object, hook: str) -> bool:
    # A Filter subclass implements what it overrides; any other IFilter
    # provider implements everything.
    if isinstance(filter_, Filter):
        return getattr(type(filter_), hook) is not getattr(Filter, hook)
    return True


class Chain:
    """
    The built filters and, per hook, the ones that implement it.

    :ivar names: the filter names in config order.
    :ivar request_hooks: ``request_received`` hooks, config order.
    :ivar connect_hooks: ``connect_requested`` hooks, config order.
    :ivar response_hooks: ``response_received`` hooks, reverse order.
    :ivar body_hooks: ``response_body`` hooks, reverse order.
    :ivar done_hooks: ``exchange_done`` hooks, reverse order.
    """

    def __init__(self, filters: Sequence[tuple[str, object]]) -> None:
        self.names = [name for name, _ in filters]
        self.size = len(filters)
        by_hook: dict[str, list[Hook]] = {hook: [] for hook in HOOKS}
        for position, (name, filter_) in enumerate(filters):
            for hook in HOOKS:
                if _implemented(filter_, hook):
                    by_hook[hook].append((position, name, getattr(filter_, hook)))
        self.request_hooks = tuple(by_hook["request_received"])
        self.connect_hooks = tuple(by_hook["connect_requested"])
        self.response_hooks = tuple(reversed(by_hook["response_received"]))
        self.body_hooks = tuple(reversed(by_hook["response_body"]))
        self.done_hooks = tuple(reversed(by_hook["exchange_done"]))

    def response_hooks_for(self, exchange: Exchange) -> Sequence[Hook]:
        """The response hooks of the filters the request phase reached."""
        if exchange.passed >= self.size:
            return self.response_hooks
        return tuple(h for h in self.response_hooks if h[0] < exchange.passed)

    def exchange_done(self, exchange: Exchange) -> None:
        """Call every ``exchange_done`` hook; a failure is only logged."""
        for _, name, hook in self.done_hooks:
            try:
                hook(exchange)
            except Exception:
                _log.failure("filter {filter} failed in exchange_done", filter=name)


Done = Callable[[Response | None], object]
Failed = Callable[[str, Failure], object]


def run_hooks(hooks: Sequence[Hook], exchange: Exchange, done: Done, failed: Failed,
              start: int = 0, request_phase: bool = False) -> None:
    """
    Run *hooks* in order until one answers with a :class:`Response`.

    Synchronous hooks are called in a loop; a ``Deferred`` or coroutine
    result suspends the loop until it fires.  Finally ``done(response)``
    is called (``None`` when no hook answered), or ``failed(name,
    failure)`` when a hook raised or returned something else.

    :param request_phase: when a hook answers, record in
        ``exchange.passed`` that the phase reached only its filter (the
        caller sets it to the chain's size before the phase).
    """
    for pos in range(start, len(hooks)):
        position, name, hook = hooks[pos]
        try:
            result = hook(exchange)
        except Exception:
            failed(name, Failure())
            return
        if result is None:
            continue
        if inspect.iscoroutine(result):
            result = Deferred.fromCoroutine(result)
        if isinstance(result, Deferred):
            result.addCallbacks(_resume, _failed, callbackArgs=(hooks, exchange, done, failed, pos, request_phase),
                                errbackArgs=(name, failed))
            return
        _answered(result, hooks, exchange, done, failed, pos, request_phase)
        return
    done(None)


def _answered(result: object, hooks, exchange: Exchange, done: Done, failed: Failed, pos: int,
              request_phase: bool) -> None:
    position, name, _ = hooks[pos]
    if not isinstance(result, Response):
        failed(name, Failure(TypeError(f"filter {name} returned {result!r}, not None or a Response")))
        return
    if request_phase:
        exchange.passed = position + 1
    done(result)


def _resume(result: object, hooks, exchange: Exchange, done: Done, failed: Failed, pos: int,
            request_phase: bool) -> None:
    if result is None:
        run_hooks(hooks, exchange, done, failed, pos + 1, request_phase)
    else:
        _answered(result, hooks, exchange, done, failed, pos, request_phase)


def _failed(failure: Failure, name: str, failed: Failed) -> None:
    failed(name, failure)
