"""
The TOML configuration (proxyframe/config.py): safe defaults, typed values
from a file, an error naming the file and the key for every mistake, and
the reference in docs/config.rst kept in step with the code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import tomllib

import pytest

from proxyframe import Config, ConfigError, load_config
from proxyframe.config import DEFAULT_LISTEN, FilterEntry, Limits, Timeouts, UpstreamSettings
from support import REPO, twistd_command

DOCS = REPO / "docs"
SECTIONS = ("timeouts", "limits", "upstream")


def write(tmp_path, text: str) -> str:
    path = tmp_path / "proxyframe.toml"
    path.write_text(text)
    return str(path)


def config_error(path: str) -> str:
    """:returns: the message of the ConfigError that loading *path* raises."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def documented_keys() -> dict[str, object]:
    """Every dotted key of the code's Config with its default value."""
    defaults = Config()
    # The filters field is written [[filter]] in the file.
    keys = {("filter" if f.name == "filters" else f.name): getattr(defaults, f.name)
            for f in dataclasses.fields(Config) if f.name not in SECTIONS and f.name != "source"}
    for section in SECTIONS:
        table = getattr(defaults, section)
        keys.update({f"{section}.{f.name}": getattr(table, f.name) for f in dataclasses.fields(table)})
    return keys


def test_defaults_are_safe():
    """
    No file: listen on 127.0.0.1:8080 only, CONNECT to 443 only, serve
    loopback clients only (the acl filter, default deny), log to stdout,
    and the documented timeouts and limits.
    """
    config = load_config(None)
    assert config == Config()
    assert config.listen == ("tcp:8080:interface=127.0.0.1",) == (DEFAULT_LISTEN,)
    assert config.connect_ports == (443,)
    assert (config.via, config.source) == ("proxyframe", None)
    assert [entry.use for entry in config.filters] == ["acl", "accesslog"]
    acl = config.filters[0].options
    assert acl == {"default": "deny", "rules": [
        {"action": "allow", "clients": ["127.0.0.0/8", "::1/128", "::ffff:127.0.0.0/104"]}]}
    assert config.timeouts == Timeouts(connect=10.0, response=60.0, header=10.0, client_idle=60.0,
                                       upstream_idle=30.0, shutdown_grace=10.0)
    assert config.limits == Limits(max_request_line=8192, max_header_bytes=65536, max_header_fields=100)
    assert config.upstream == UpstreamSettings(max_idle_per_origin=128, max_idle=1024)


def test_full_file_gives_typed_values(tmp_path):
    """Every key read from a file, with its type: lists become tuples, integers are accepted for seconds."""
    path = write(tmp_path, """
        listen = ["tcp:3128:interface=127.0.0.1", "tcp6:3128:interface=\\\\:\\\\:1"]
        connect_ports = [443, 8443]
        via = "edge-1.example"
        filter = []

        [timeouts]
        connect = 5
        response = 2.5
        header = 3
        client_idle = 120
        upstream_idle = 7.5
        shutdown_grace = 1

        [limits]
        max_request_line = 4096
        max_header_bytes = 32768
        max_header_fields = 50

        [upstream]
        max_idle_per_origin = 4
        max_idle = 16
    """)
    config = load_config(path)
    assert config == Config(
        listen=("tcp:3128:interface=127.0.0.1", "tcp6:3128:interface=\\:\\:1"),
        connect_ports=(443, 8443), via="edge-1.example", filters=(),
        timeouts=Timeouts(5.0, 2.5, 3.0, 120.0, 7.5, 1.0),
        limits=Limits(4096, 32768, 50), upstream=UpstreamSettings(4, 16), source=path)
    assert all(type(getattr(config.timeouts, f.name)) is float for f in dataclasses.fields(Timeouts))
    assert type(config.connect_ports) is tuple and type(config.listen) is tuple


def test_partial_table_keeps_other_defaults(tmp_path):
    """A table that sets one key leaves the others of that table at their defaults."""
    config = load_config(write(tmp_path, "[timeouts]\nresponse = 1\n"))
    assert config.timeouts == dataclasses.replace(Timeouts(), response=1.0)
    assert config.replace(source=None) == Config(timeouts=config.timeouts)


def test_replace_changes_only_given_fields():
    """Config.replace returns a changed copy (used for --listen); the original is frozen and unchanged."""
    config = Config()
    changed = config.replace(listen=("tcp:0",))
    assert changed.listen == ("tcp:0",) and changed.connect_ports == config.connect_ports
    assert config.listen == (DEFAULT_LISTEN,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.via = "x"


@pytest.mark.parametrize("text, key, expected", [
    ('colour = "red"\n', "colour", "unknown key 'colour' (expected one of: connect_ports, filter"),
    ('source = "x.toml"\n', "source", "unknown key 'source'"),
    ("timeouts = 5\n", "timeouts", "[timeouts] must be a table"),
    ("via = 3\n", "via", "via must be a string, not 3"),
    ('[timeouts]\nconnect = "5"\n', "timeouts.connect", "timeouts.connect must be a number, not '5'"),
    ("[timeouts]\nconnect = true\n", "timeouts.connect", "timeouts.connect must be a number, not True"),
    ("[limits]\nmax_header_fields = 1.5\n", "limits.max_header_fields", "must be an integer, not 1.5"),
    ("[limits]\nmax_request_line = 8192.0\n", "limits.max_request_line", "must be an integer, not 8192.0"),
    ('listen = "tcp:8080"\n', "listen", "listen must be a list of strings"),
    ("listen = [8080]\n", "listen[0]", "listen[0] must be a string, not 8080"),
    ('connect_ports = [443, "8443"]\n', "connect_ports[1]", "connect_ports[1] must be an integer, not '8443'"),
    ("connect_ports = [443, 4.5]\n", "connect_ports[1]", "must be an integer, not 4.5"),
    ("listen = []\n", "listen", "listen must name at least one endpoint"),
    ("connect_ports = [443, 70000]\n", "connect_ports", "70000 is not a TCP port (1-65535)"),
    ("connect_ports = [0]\n", "connect_ports", "0 is not a TCP port"),
    ("connect_ports = [-443]\n", "connect_ports", "-443 is not a TCP port"),
    ("[timeouts]\nresponse = 0\n", "timeouts.response", "timeouts.response must be greater than 0"),
    ("[timeouts]\nheader = -1.5\n", "timeouts.header", "timeouts.header must be greater than 0"),
    ("[limits]\nmax_header_bytes = 0\n", "limits.max_header_bytes", "must be greater than 0"),
    ("[upstream]\nmax_idle = -1\n", "upstream.max_idle", "upstream.max_idle must be greater than 0"),
    ('via = "my proxy"\n', "via", "via must be a token"),
    ('via = "a,b"\n', "via", "via must be a token"),
    ('via = "a;b"\n', "via", "via must be a token"),
    ('via = "a\\tb"\n', "via", "via must be a token"),
    ('via = ""\n', "via", "via must be a token"),
])
def test_bad_value_names_file_and_key(tmp_path, text, key, expected):
    """Every mistake raises ConfigError whose message names the file, the (dotted) key, and what was expected."""
    path = write(tmp_path, text)
    message = config_error(path)
    assert message.startswith(f"{path}: ")
    assert key in message and expected in message


def test_unknown_key_in_table_names_dotted_key(tmp_path):
    """An unknown key inside a table is named by its dotted key and the table's keys are listed."""
    path = write(tmp_path, "[timeouts]\nconect = 5\n")
    message = config_error(path)
    assert message.startswith(f"{path}: ")
    assert "timeouts.conect" in message
    assert "(expected one of: client_idle, connect, header, response, shutdown_grace, upstream_idle)" in message


def test_not_a_list_of_integers(tmp_path):
    """A scalar where a list of integers is expected says so in plain words."""
    path = write(tmp_path, "connect_ports = 443\n")
    assert config_error(path) == f"{path}: connect_ports must be a list of integers"


@pytest.mark.parametrize("via", ["prøxy", "a(b)", "a/b", 'a"b'])
def test_via_must_be_a_token(tmp_path, via):
    """via is a pseudonym, i.e. a token (RFC 9110 §5.6.2, §7.6.3): other values are a ConfigError."""
    path = write(tmp_path, f"via = {json.dumps(via, ensure_ascii=False)}\n")
    message = config_error(path)
    assert message.startswith(f"{path}: ") and "via" in message


def test_bad_toml_names_file_and_line(tmp_path):
    """A file that is not TOML is reported with the file and the parser's line and column."""
    path = write(tmp_path, 'listen = ["tcp:0"]\n\nvia proxyframe\n')
    message = config_error(path)
    assert message.startswith(f"{path}: not valid TOML: ")
    assert "line 3" in message


def test_missing_file(tmp_path):
    """A file that cannot be read is reported with its path and the OS reason, not as the defaults."""
    path = str(tmp_path / "absent.toml")
    assert config_error(path) == f"{path}: cannot read: No such file or directory"


def test_twistd_reports_bad_config_without_traceback(tmp_path):
    """twistd proxyframe with a bad file exits 1 and prints the ConfigError message, no traceback."""
    path = write(tmp_path, "[limits]\nmax_header_fields = 1.5\n")
    out = subprocess.run(twistd_command() + ["-n", "--pidfile=", "proxyframe", "--config", path],
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=60)
    output = out.stdout + out.stderr
    assert out.returncode == 1, output
    assert f"{path}: limits.max_header_fields must be an integer, not 1.5" in output
    assert "Traceback" not in output


def as_toml_value(value: object) -> object:
    if isinstance(value, tuple):
        return [as_toml_value(v) for v in value]
    if isinstance(value, FilterEntry):
        return {"use": value.use, **value.options}
    return value


def documented_default(key: str, value: object) -> str:
    """How config.rst states a default: JSON, or the filter names for the chain."""
    if key == "filter":
        return ", ".join(entry.use for entry in value)
    return json.dumps(as_toml_value(value))


def test_docs_defaults_file_matches_code():
    """docs/examples/defaults.toml, shown in the reference as 'every key at its default', sets every key to it."""
    path = DOCS / "examples" / "defaults.toml"
    assert load_config(str(path)) == Config(source=str(path))
    with open(path, "rb") as f:
        data = tomllib.load(f)
    flat = {}
    for top, value in data.items():
        if isinstance(value, dict):
            flat.update({f"{top}.{key}": v for key, v in value.items()})
        else:
            flat[top] = value
    assert flat == {key: as_toml_value(v) for key, v in documented_keys().items()}


def test_docs_reference_lists_every_key_with_its_default():
    """docs/config.rst has one entry per key of the code, each stating the code's default, and no stale keys."""
    text = (DOCS / "config.rst").read_text()
    entries = dict(re.findall(r"^``([a-z_.]+)``\n +[A-Z][^\n]*?default ``([^`]+)``", text, re.M))
    expected = {key: documented_default(key, v) for key, v in documented_keys().items()}
    assert entries == expected
