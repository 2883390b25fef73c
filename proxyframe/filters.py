"""
What a filter author imports: the :class:`Filter` base class, whose hooks
do nothing, and the :class:`FilterContext` a factory's ``build`` receives.
The contract itself is in :mod:`proxyframe.interfaces`.

A complete filter plugin is ``docs/examples/plugins/pf_no_delete.py``,
explained in ``docs/plugins.rst``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from zope.interface import implementer

from proxyframe.config import Config, ConfigError
from proxyframe.interfaces import IFilter

__all__ = ["Filter", "FilterContext", "HOOKS", "check_options", "number_option"]

#: The hook names of :class:`~proxyframe.interfaces.IFilter`.
HOOKS = ("request_received", "connect_requested", "response_received", "response_body", "exchange_done")


@implementer(IFilter)
class Filter:
    """
    Base class for filters: every hook does nothing.  Override the hooks
    you need; the chain calls only overridden ones.
    """

    def request_received(self, exchange):
        return None

    def connect_requested(self, exchange):
        return None

    def response_received(self, exchange):
        return None

    def response_body(self, exchange, data: bytes) -> bytes:
        return data

    def exchange_done(self, exchange) -> None:
        return None


def check_options(options: dict, allowed: Iterable[str]) -> None:
    """
    Refuse options a filter does not know (a typo must not pass silently).

    :param options: the ``[[filter]]`` table's keys, as ``build`` got them.
    :param allowed: the option names the filter takes.
    :raises ConfigError: naming the first unknown option and the allowed ones.
    """
    allowed = tuple(allowed)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r} (expected: {', '.join(allowed)})")


def number_option(options: dict, key: str, default: float, minimum: float = 0.0, integer: bool = False,
                  unit: str = "") -> float:
    """
    Read a numeric option (TOML integer or float; booleans refused).

    :param default: the value when *key* is absent.
    :param minimum: the smallest value allowed.
    :param integer: whether only integers are allowed (sizes in bytes).
    :param unit: what the number counts, for the message (``"seconds"``).
    :returns: the value (``int`` when *integer*, else ``float``).
    :raises ConfigError: naming the option, what was expected and what
        was found.
    """
    value = options.get(key, default)
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
        what = "an integer" if integer else "a number"
        unit = f" of {unit}" if unit else ""
        raise ConfigError(f"{key} must be {what}{unit} >= {minimum:g}, not {value!r}")
    return value if integer else float(value)


@dataclass(frozen=True)
class FilterContext:
    """
    What :meth:`~proxyframe.interfaces.IFilterFactory.build` gets besides
    the options.

    :ivar reactor: the reactor the proxy runs on (for timers,
        ``deferToThreadPool``, connections).
    :ivar config: the whole :class:`~proxyframe.config.Config`.
    :ivar base: the directory relative paths in options are resolved
        against (the config file's directory, or the working directory).
    :ivar position: the entry's index in the ``[[filter]]`` list (from 0).
    """

    reactor: object
    config: Config
    base: Path
    position: int

    def path(self, value: str) -> Path:
        """:returns: *value* resolved against :attr:`base`."""
        return (self.base / value).resolve()
