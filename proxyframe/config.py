"""
Configuration: a TOML file (read with :mod:`tomllib`) turned into typed,
frozen values.

A missing file means the safe default: listen on ``127.0.0.1:8080`` only,
CONNECT to port 443 only.  A malformed file, an unknown key or a value of the
wrong type raises :class:`ConfigError`, whose message names the file, the key
and what was expected; ``twistd proxyframe`` prints it and exits without a
traceback.

Durations are seconds (``float``), sizes are bytes (``int``).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass, field

__all__ = [
    "Config",
    "ConfigError",
    "FilterEntry",
    "DEFAULT_FILTERS",
    "Limits",
    "Timeouts",
    "UpstreamSettings",
    "load_config",
    "DEFAULT_LISTEN",
]

#: The listener used when neither the config nor ``--listen`` names one:
#: loopback only, so a default install is never an open proxy.
DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"


class ConfigError(Exception):
    """
    The configuration cannot be used.  The message names the file (when
    there is one), the dotted key, and what was expected.
    """


@dataclass(frozen=True, slots=True)
class Timeouts:
    """
    Timeouts, in seconds.

    :ivar connect: opening a TCP connection to the upstream, including name
        resolution; past it the client gets 504 (``connection_timeout``).
    :ivar response: waiting for the upstream's response head, and for each
        later read of its body while the client is not pausing it; past it
        the client gets 504 (``http_response_timeout``) or, mid-body, the
        connection is closed.
    :ivar header: a client's whole request head must arrive within this, or
        it gets 408 and the connection is closed (slowloris defence).
    :ivar client_idle: a keep-alive client connection with no request in
        progress is closed after this.
    :ivar upstream_idle: an idle pooled upstream connection is closed after
        this.
    :ivar shutdown_grace: on SIGTERM/SIGINT, in-flight exchanges get this
        long to finish before their connections are aborted.
    """

    connect: float = 10.0
    response: float = 60.0
    header: float = 10.0
    client_idle: float = 60.0
    upstream_idle: float = 30.0
    shutdown_grace: float = 10.0


@dataclass(frozen=True, slots=True)
class Limits:
    """
    Size limits on what a client sends (RFC 9112 §3, RFC 6585 §5).

    :ivar max_request_line: bytes in the request line; longer gets 414.
    :ivar max_header_bytes: bytes in the whole request head (request line
        and field lines); larger gets 431.  The same bound applies to a
        response head from the upstream (502 past it).
    :ivar max_header_fields: field lines in one head; more gets 431.
    """

    max_request_line: int = 8192
    max_header_bytes: int = 65536
    max_header_fields: int = 100


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """
    The pool of persistent connections to origin servers.

    :ivar max_idle_per_origin: idle connections kept per origin
        (scheme, host, port); more are closed when released.
    :ivar max_idle: idle connections kept in all; the oldest idle one is
        closed to make room.
    """

    max_idle_per_origin: int = 128
    max_idle: int = 1024


@dataclass(frozen=True, slots=True)
class FilterEntry:
    """
    One ``[[filter]]`` table: which plugin, and its options.

    :ivar use: the plugin's name (``IFilterFactory.name``).
    :ivar options: the table's other keys, as parsed (checked by the
        plugin's ``build``, not here).
    """

    use: str
    options: dict = field(default_factory=dict)


#: The chain when the config names no filter: the ``acl`` filter serving
#: loopback clients only (so that listening on a public address does not
#: make an open proxy by accident), then the ``accesslog`` filter writing
#: Squid-format lines to standard output.  A config with ``[[filter]]``
#: entries replaces it; ``filter = []`` means no filter at all.
DEFAULT_FILTERS = (
    FilterEntry("acl", {"default": "deny", "rules": [
        {"action": "allow", "clients": ["127.0.0.0/8", "::1/128", "::ffff:127.0.0.0/104"]},
    ]}),
    FilterEntry("accesslog", {}),
)


@dataclass(frozen=True, slots=True)
class Config:
    """
    The whole proxy configuration.

    :ivar listen: Twisted server endpoint strings (``tcp:8080:interface=
        127.0.0.1``, ``tcp6:8080:interface=\\:\\:1``); the proxy accepts on
        each of them (with ``workers`` > 1, only ``tcp:`` and
        ``tcp6:`` endpoints).
    :ivar connect_ports: destination ports a CONNECT tunnel may be opened
        to; any other port gets 403 (RFC 9110 §9.3.6 advises limiting them).
    :ivar splice: move bytes that need no work inside the kernel with
        ``splice(2)``, where the system has it (Linux) and both connections
        are plain TCP (:mod:`proxyframe.protocol.splice`): CONNECT tunnels,
        and the rest of a response body of known length (256 KiB or more
        after the head's read) that no filter reads and that goes out
        unchanged; ``false`` relays every byte through Python.  The bytes
        are the same either way.
    :ivar via: the pseudonym this proxy adds to ``Via`` (RFC 9110 §7.6.3).
    :ivar workers: how many processes serve the listening sockets: ``1``
        is one process and no supervisor; ``N`` > 1 is a supervisor that
        opens the sockets and runs N worker processes sharing them
        (:mod:`proxyframe.workers`); ``0`` (the default) is one worker per
        core (:func:`os.cpu_count`).  Negative is a :class:`ConfigError`.
    :ivar plugin_paths: directories whose ``.py`` files are searched for
        filter plugins, besides installed ones (relative to the config
        file's directory).
    :ivar filters: the ``[[filter]]`` entries, in order: the request phase
        runs them in this order, the response phase in reverse.  Without
        any in the file, :data:`DEFAULT_FILTERS`: only loopback clients
        are served, and each exchange is logged to standard output.
    :ivar source: the file this was read from, or ``None`` for defaults.
    """

    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    connect_ports: tuple[int, ...] = (443,)
    splice: bool = True
    via: str = "proxyframe"
    workers: int = 0
    plugin_paths: tuple[str, ...] = ()
    filters: tuple[FilterEntry, ...] = DEFAULT_FILTERS
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    source: str | None = None

    def replace(self, **changes: object) -> Config:
        """
        :returns: a copy with the given top-level fields changed.
        """
        return dataclasses.replace(self, **changes)


_SECTIONS: dict[str, type] = {
    "timeouts": Timeouts,
    "limits": Limits,
    "upstream": UpstreamSettings,
}
_NOT_IN_FILE = frozenset({"source", "filters"} | set(_SECTIONS))


def load_config(path: str | None) -> Config:
    """
    Read a TOML config file.

    :param path: the file, or ``None`` for the built-in safe default.
    :returns: the validated :class:`Config`.
    :raises ConfigError: the file cannot be read or parsed, a key is
        unknown, or a value has the wrong type or range; the message names
        the file and the key.
    """
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return config_from_dict(data, source=path)


def config_from_dict(data: dict, source: str | None = None) -> Config:
    """
    Build a :class:`Config` from parsed TOML (a ``dict``).

    :raises ConfigError: as :func:`load_config`.
    """
    where = f"{source}: " if source else ""
    top = typing.get_type_hints(Config)
    values: dict[str, object] = {}
    for key, value in data.items():
        if key == "filter":
            values["filters"] = _filters(value, where)
        elif key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}[{key}] must be a table")
            values[key] = _build(_SECTIONS[key], value, f"{key}.", where)
        elif key in top and key not in _NOT_IN_FILE:
            values[key] = _convert(value, top[key], key, where)
        else:
            raise ConfigError(
                f"{where}unknown key {key!r} (expected one of: "
                f"{', '.join(sorted((set(top) - {'source', 'filters'}) | {'filter'}))})"
            )
    config = Config(source=source, **values)
    _check(config, where)
    return config


def _filters(value: object, where: str) -> tuple[FilterEntry, ...]:
    """``[[filter]]``: an array of tables, each with a string ``use``."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"{where}filter must be an array of tables ([[filter]])")
    entries = []
    for i, table in enumerate(value):
        options = dict(table)
        use = options.pop("use", None)
        if not isinstance(use, str) or not use:
            raise ConfigError(f"{where}filter[{i}].use must name a filter plugin (a string)")
        entries.append(FilterEntry(use, options))
    return tuple(entries)


def _build(cls: type, table: dict, prefix: str, where: str) -> object:
    fields = typing.get_type_hints(cls)
    values = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(
                f"{where}unknown key '{prefix}{key}' (expected one of: "
                f"{', '.join(sorted(fields))})"
            )
        values[key] = _convert(value, fields[key], prefix + key, where)
    return cls(**values)


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_PLURAL_NAMES = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
# RFC 9110 §5.6.2 token, the form of a Via pseudonym (§7.6.3).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _convert(value: object, hint: object, key: str, where: str) -> object:
    """Check one TOML value against a field's resolved type hint."""
    if typing.get_origin(hint) is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if not isinstance(value, list):
            raise ConfigError(f"{where}{key} must be a list of {_PLURAL_NAMES[item]}")
        return tuple(_scalar(v, item, f"{key}[{i}]", where) for i, v in enumerate(value))
    return _scalar(value, hint, key, where)


def _scalar(value: object, kind: type, key: str, where: str) -> object:
    # bool is an int in Python, and TOML integers are fine where a float is
    # wanted, but not the other way round.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        raise ConfigError(f"{where}{key} must be {_TYPE_NAMES[kind]}, not {value!r}")
    return value


def _check(config: Config, where: str) -> None:
    """Range checks that types alone cannot express."""
    if not config.listen:
        raise ConfigError(f"{where}listen must name at least one endpoint")
    for port in config.connect_ports:
        if not 0 < port < 65536:
            raise ConfigError(f"{where}connect_ports: {port} is not a TCP port (1-65535)")
    for section in _SECTIONS:
        for f in dataclasses.fields(getattr(config, section)):
            if getattr(getattr(config, section), f.name) <= 0:
                raise ConfigError(f"{where}{section}.{f.name} must be greater than 0")
    if config.workers < 0:
        raise ConfigError(f"{where}workers must be 0 (one per core) or more, not {config.workers}")
    if not _TOKEN.fullmatch(config.via):
        raise ConfigError(f"{where}via must be a token (ASCII letters, digits and !#$%&'*+-.^_`|~), "
                          f"not {config.via!r}")

