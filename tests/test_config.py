"""The configuration file, the twistd options and the plugin registry."""

from __future__ import annotations

import copy
import math

import pytest
from twisted.internet.task import Clock
from twisted.python import usage
from zope.interface.verify import verifyObject

from smtpguard import config, registry
from smtpguard.config import Config, ConfigError, Listener
from smtpguard.interfaces import IPolicy, IPolicyFactory, IScanner, IScannerFactory
from smtpguard.results import SizeLimit
from smtpguard.server import GuardFactory, ServerSettings
from smtpguard.tap import Options, build_factory, scanner_table
from smtpguard.upstream import UpstreamSettings, UpstreamTLS

SOURCE = "/etc/smtpguard.toml"
MINIMAL = {"upstream": {"endpoint": "tcp:127.0.0.1:10026"}, "scanners": [{"type": "builtin"}]}


def with_values(**tables):
    """MINIMAL with keys of some tables set (``server={"x": 1}``) or tables replaced (``scanners=[]``)."""
    data = copy.deepcopy(MINIMAL)
    for name, value in tables.items():
        if isinstance(value, dict):
            data.setdefault(name, {}).update(value)
        else:
            data[name] = value
    return data


def error_of(data) -> str:
    with pytest.raises(ConfigError) as caught:
        config.parse(data, SOURCE)
    return str(caught.value)


# -- parse --------------------------------------------------------------------------


def test_minimal_config():
    """A next hop and one scanner are enough; the rest are defaults."""
    assert config.parse(MINIMAL, SOURCE) == Config(
        source=SOURCE,
        listen=("tcp:10025:interface=127.0.0.1",),
        server=ServerSettings(),
        upstream=UpstreamSettings(endpoint="tcp:127.0.0.1:10026"),
        scanners=({"type": "builtin"},),
        policy={},
        tls_certificate=None,
        tls_key=None,
        scan_timeout=120.0,
        listeners=(Listener("tcp:10025:interface=127.0.0.1"),),
    )


def test_full_config():
    """Every setting is read into its place; integers are accepted for numbers."""
    data = {
        "server": {
            "listen": ["tcp:2525", "unix:/run/smtpguard.sock"],
            "hostname": "guard.example",
            "max_message_size": 1000,
            "max_recipients": 5,
            "max_connections": 6,
            "max_line_length": 1000,
            "command_timeout": 10,
            "data_timeout": 20.5,
            "session_timeout": 30,
            "message_timeout": 120,
            "spool_memory": 4096,
            "spool_directory": "/var/spool/smtpguard",
            "require_tls": True,
            "tls_certificate": "/etc/cert.pem",
            "tls_key": "/etc/key.pem",
        },
        "upstream": {
            "endpoint": "tcp:mx.example:25",
            "tls": "required",
            "tls_hostname": "mx.example",
            "tls_ca": "/etc/ca.pem",
            "xforward": False,
            "timeout": 60,
            "connect_timeout": 5.5,
        },
        "scanners": [{"type": "clamd", "endpoint": "unix:/run/clamav/clamd.ctl"}, {"type": "builtin"}],
        "policy": {"type": "default", "on_virus": "reject"},
        "scanning": {"timeout": 30},
    }
    assert config.parse(data, SOURCE) == Config(
        source=SOURCE,
        listen=("tcp:2525", "unix:/run/smtpguard.sock"),
        server=ServerSettings(
            hostname="guard.example",
            max_message_size=1000,
            max_recipients=5,
            max_connections=6,
            max_line_length=1000,
            command_timeout=10.0,
            data_timeout=20.5,
            session_timeout=30.0,
            message_timeout=120.0,
            spool_memory=4096,
            spool_directory="/var/spool/smtpguard",
            require_tls=True,
        ),
        upstream=UpstreamSettings(
            endpoint="tcp:mx.example:25",
            hostname="guard.example",
            tls=UpstreamTLS.REQUIRED,
            tls_hostname="mx.example",
            tls_ca="/etc/ca.pem",
            xforward=False,
            timeout=60.0,
            connect_timeout=5.5,
        ),
        scanners=({"type": "clamd", "endpoint": "unix:/run/clamav/clamd.ctl"}, {"type": "builtin"}),
        policy={"type": "default", "on_virus": "reject"},
        tls_certificate="/etc/cert.pem",
        tls_key="/etc/key.pem",
        scan_timeout=30.0,
        listeners=(Listener("tcp:2525"), Listener("unix:/run/smtpguard.sock")),
        max_message_size_set=True,
    )


def test_listen_as_single_string():
    """A single listen endpoint may be given as a string."""
    assert config.parse(with_values(server={"listen": "tcp:2525"}), SOURCE).listen == ("tcp:2525",)


def test_default_source_name():
    """Without a source the messages say <config>."""
    with pytest.raises(ConfigError, match=r"^<config>: upstream\.endpoint: "):
        config.parse({"scanners": [{"type": "builtin"}]})


def test_wrong_type_integer():
    """A string where an integer belongs names the key and both types."""
    assert error_of(with_values(server={"max_recipients": "10"})) == (
        f"{SOURCE}: server.max_recipients: expected an integer, got '10'"
    )


def test_wrong_type_bool_for_integer():
    """true is not an integer."""
    assert error_of(with_values(server={"max_connections": True})) == (
        f"{SOURCE}: server.max_connections: expected an integer, got True"
    )


def test_wrong_type_float_for_integer():
    """1.5 is not an integer."""
    assert error_of(with_values(server={"spool_memory": 1.5})) == (
        f"{SOURCE}: server.spool_memory: expected an integer, got 1.5"
    )


def test_wrong_type_number():
    """A string where a number belongs."""
    assert error_of(with_values(upstream={"timeout": "5s"})) == (
        f"{SOURCE}: upstream.timeout: expected a number, got '5s'"
    )


def test_wrong_type_bool():
    """A string where true/false belongs."""
    assert error_of(with_values(upstream={"xforward": "yes"})) == (
        f"{SOURCE}: upstream.xforward: expected true or false, got 'yes'"
    )


def test_wrong_type_string():
    """A number where a string belongs."""
    assert error_of(with_values(server={"hostname": 5})) == f"{SOURCE}: server.hostname: expected a string, got 5"


def test_wrong_type_listen():
    """listen must be strings."""
    assert error_of(with_values(server={"listen": ["tcp:1", 2]})) == (
        f"{SOURCE}: server.listen: expected a list of strings, got ['tcp:1', 2]"
    )


def test_empty_listen():
    """An empty listen list is refused."""
    assert error_of(with_values(server={"listen": []})) == f"{SOURCE}: server.listen: at least one endpoint is needed"


def test_table_not_a_table():
    """A table given as a scalar is named."""
    assert error_of(with_values(server=5)) == f"{SOURCE}: server: must be a table"


def test_unknown_key_in_server():
    """An unknown key in [server] is named with its table."""
    assert error_of(with_values(server={"max_size": 5})) == f"{SOURCE}: server.max_size: unknown key"


def test_unknown_key_in_upstream():
    """An unknown key in [upstream] is named with its table."""
    assert error_of(with_values(upstream={"port": 25})) == f"{SOURCE}: upstream.port: unknown key"


def test_unknown_top_level_key():
    """An unknown top-level key is named."""
    assert error_of(with_values(scanner=[{"type": "builtin"}])) == f"{SOURCE}: scanner: unknown key"


def test_unknown_key_in_scanning():
    """An unknown key in [scanning] (a misspelt timeout) is named too."""
    assert error_of(with_values(scanning={"timout": 5})) == f"{SOURCE}: scanning.timout: unknown key"


def test_missing_upstream_endpoint():
    """No [upstream] endpoint: required, with an example."""
    data = with_values()
    del data["upstream"]
    assert error_of(data) == f'{SOURCE}: upstream.endpoint: is required (e.g. "tcp:127.0.0.1:10026")'


def test_upstream_endpoint_wrong_type():
    """The endpoint must be a string."""
    assert error_of(with_values(upstream={"endpoint": 10026})) == (
        f"{SOURCE}: upstream.endpoint: expected a string, got 10026"
    )


@pytest.mark.parametrize("scanners", [None, []])
def test_no_scanners(scanners):
    """Without [[scanners]] (missing or empty) the start is refused."""
    data = with_values()
    if scanners is None:
        del data["scanners"]
    else:
        data["scanners"] = scanners
    assert error_of(data) == (f'{SOURCE}: scanners: at least one [[scanners]] table is needed (e.g. type = "builtin")')


def test_scanner_without_type():
    """A scanner table without type is named by index."""
    assert error_of(with_values(scanners=[{"endpoint": "unix:/x"}])) == (
        f"{SOURCE}: scanners[0].type: is required (builtin, clamd, icap, command or a plugin's name)"
    )


def test_second_scanner_without_type():
    """The index is that of the bad table."""
    assert error_of(with_values(scanners=[{"type": "builtin"}, {"type": 3}])) == (
        f"{SOURCE}: scanners[1].type: is required (builtin, clamd, icap, command or a plugin's name)"
    )


def test_scanner_not_a_table():
    """A scanner that is not a table is named by index."""
    assert error_of(with_values(scanners=["builtin"])) == f"{SOURCE}: scanners[0]: must be a table"


def test_certificate_without_key():
    """tls_certificate needs tls_key."""
    assert error_of(with_values(server={"tls_certificate": "/etc/cert.pem"})) == (
        f"{SOURCE}: server.tls_key: tls_certificate and tls_key go together"
    )


def test_key_without_certificate():
    """tls_key needs tls_certificate."""
    assert error_of(with_values(server={"tls_key": "/etc/key.pem"})) == (
        f"{SOURCE}: server.tls_certificate: tls_certificate and tls_key go together"
    )


def test_require_tls_without_certificate():
    """require_tls without a certificate cannot work."""
    assert error_of(with_values(server={"require_tls": True})) == (
        f"{SOURCE}: server.require_tls: needs tls_certificate and tls_key"
    )


def test_bad_upstream_tls_choice():
    """upstream.tls lists the choices."""
    assert error_of(with_values(upstream={"tls": "maybe"})) == (
        f"{SOURCE}: upstream.tls: must be one of none, opportunistic, required, got 'maybe'"
    )


@pytest.mark.parametrize(
    ("table", "key", "value", "shown"),
    [
        ("server", "max_message_size", 0, "0"),
        ("server", "max_recipients", -1, "-1"),
        ("server", "max_connections", 0, "0"),
        ("server", "max_line_length", 0, "0"),
        ("server", "command_timeout", 0, "0.0"),
        ("server", "data_timeout", -1.5, "-1.5"),
        ("server", "session_timeout", 0.0, "0.0"),
        ("server", "message_timeout", -1, "-1.0"),
        ("server", "spool_memory", 0, "0"),
        ("upstream", "timeout", -1, "-1.0"),
        ("upstream", "connect_timeout", 0, "0.0"),
        ("scanning", "timeout", 0, "0.0"),
    ],
)
def test_non_positive_numbers(table, key, value, shown):
    """Sizes, counts and timeouts must be greater than 0."""
    assert error_of(with_values(**{table: {key: value}})) == (
        f"{SOURCE}: {table}.{key}: must be greater than 0, got {shown}"
    )


def test_nan_timeout_refused():
    """nan (valid TOML) is not greater than 0 either."""
    assert error_of(with_values(upstream={"timeout": math.nan})) == (
        f"{SOURCE}: upstream.timeout: must be greater than 0, got nan"
    )


# -- load ---------------------------------------------------------------------------


def test_load_file(tmp_path):
    """load() parses a TOML file and names it as the source."""
    path = tmp_path / "smtpguard.toml"
    path.write_text('[upstream]\nendpoint = "tcp:127.0.0.1:10026"\n\n[[scanners]]\ntype = "builtin"\n')
    assert config.load(str(path)) == config.parse(MINIMAL, str(path))


def test_load_invalid_toml(tmp_path):
    """Invalid TOML names the file and the position."""
    path = tmp_path / "smtpguard.toml"
    path.write_text("[upstream\nendpoint = 1\n")
    with pytest.raises(ConfigError) as caught:
        config.load(str(path))
    assert str(caught.value).startswith(f"{path}: not valid TOML: ")
    assert "line 1" in str(caught.value)


def test_load_missing_file(tmp_path):
    """A missing file names the file and the reason."""
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as caught:
        config.load(str(path))
    assert str(caught.value) == f"{path}: cannot read: No such file or directory"


def test_load_error_names_file(tmp_path):
    """Errors in a loaded file carry its path."""
    path = tmp_path / "smtpguard.toml"
    path.write_text('[upstream]\nendpoint = "tcp:1"\nfoo = 1\n\n[[scanners]]\ntype = "builtin"\n')
    with pytest.raises(ConfigError) as caught:
        config.load(str(path))
    assert str(caught.value) == f"{path}: upstream.foo: unknown key"


# -- twistd options -----------------------------------------------------------------


def parsed(*arguments: str) -> Config:
    options = Options()
    options.parseOptions(list(arguments))
    return options["loaded"]


def test_options_command_line_only():
    """--listen (repeatable), --upstream and --scanner (repeatable) are enough."""
    loaded = parsed(
        "--listen", "tcp:2525",
        "-l", "tcp:2526",
        "--upstream", "tcp:127.0.0.1:10026",
        "--scanner", "builtin",
        "-s", "clamd:unix:/run/clamav/clamd.ctl",
    )  # fmt: skip
    assert (loaded.source, loaded.listen, loaded.upstream.endpoint, loaded.scanners) == (
        "command line",
        ("tcp:2525", "tcp:2526"),
        "tcp:127.0.0.1:10026",
        ({"type": "builtin"}, {"type": "clamd", "endpoint": "unix:/run/clamav/clamd.ctl"}),
    )


def test_options_hostname():
    """--hostname sets the server name and the EHLO name towards the next hop."""
    loaded = parsed("--upstream", "tcp:127.0.0.1:10026", "--scanner", "builtin", "--hostname", "guard.example")
    assert (loaded.server.hostname, loaded.upstream.hostname) == ("guard.example", "guard.example")


def test_options_override_config(tmp_path):
    """Command-line values replace the file's; the rest of the file stays."""
    path = tmp_path / "smtpguard.toml"
    path.write_text(
        '[server]\nlisten = ["tcp:1"]\nmax_recipients = 7\n\n'
        '[upstream]\nendpoint = "tcp:127.0.0.1:1"\ntimeout = 9\n\n'
        '[[scanners]]\ntype = "clamd"\n'
    )
    loaded = parsed("--config", str(path), "--listen", "tcp:2", "--upstream", "tcp:127.0.0.1:2", "--scanner", "builtin")
    assert (
        loaded.source,
        loaded.listen,
        loaded.server.max_recipients,
        loaded.upstream.endpoint,
        loaded.upstream.timeout,
        loaded.scanners,
    ) == (str(path), ("tcp:2",), 7, "tcp:127.0.0.1:2", 9.0, ({"type": "builtin"},))


def test_options_config_alone(tmp_path):
    """--config alone takes everything from the file."""
    path = tmp_path / "smtpguard.toml"
    path.write_text('[upstream]\nendpoint = "tcp:127.0.0.1:10026"\n\n[[scanners]]\ntype = "builtin"\n')
    assert parsed("-c", str(path)) == config.parse(MINIMAL, str(path))


def test_options_bad_config_is_usage_error():
    """A configuration error becomes a UsageError with the message."""
    with pytest.raises(usage.UsageError) as caught:
        parsed("--scanner", "builtin")
    assert str(caught.value) == 'command line: upstream.endpoint: is required (e.g. "tcp:127.0.0.1:10026")'


def test_options_missing_config_file_is_usage_error(tmp_path):
    """A missing --config file becomes a UsageError naming it."""
    path = tmp_path / "missing.toml"
    with pytest.raises(usage.UsageError) as caught:
        parsed("--config", str(path))
    assert str(caught.value) == f"{path}: cannot read: No such file or directory"


@pytest.mark.parametrize(
    ("spec", "table"),
    [
        ("builtin", {"type": "builtin"}),
        ("clamd:unix:/run/clamav/clamd.ctl", {"type": "clamd", "endpoint": "unix:/run/clamav/clamd.ctl"}),
        ("clamd:tcp:127.0.0.1:3310", {"type": "clamd", "endpoint": "tcp:127.0.0.1:3310"}),
        ("icap://127.0.0.1:1344/avscan", {"type": "icap", "url": "icap://127.0.0.1:1344/avscan"}),
    ],
)
def test_scanner_table(spec, table):
    """--scanner values become [[scanners]] tables."""
    assert scanner_table(spec) == table


# -- plugins and build_factory --------------------------------------------------------


def test_registry_finds_builtin_scanner():
    """The bundled 'builtin' scanner factory is found and provides IScannerFactory."""
    factory = registry.factories(IScannerFactory)["builtin"]
    assert verifyObject(IScannerFactory, factory)
    assert verifyObject(IScanner, factory.build({}, Clock()))


def test_registry_finds_default_policy():
    """The bundled 'default' policy factory is found and provides IPolicyFactory."""
    factory = registry.factories(IPolicyFactory)["default"]
    assert verifyObject(IPolicyFactory, factory)
    assert verifyObject(IPolicy, factory.build({}))


def test_build_factory():
    """A valid configuration builds the listening factory."""
    assert isinstance(build_factory(config.parse(MINIMAL, SOURCE), Clock()), GuardFactory)


def test_build_factory_unknown_scanner():
    """An unknown scanner type names the key and lists the available ones."""
    available = ", ".join(sorted(registry.factories(IScannerFactory)))
    assert "builtin" in available.split(", ")
    loaded = config.parse(with_values(scanners=[{"type": "builtin"}, {"type": "nosuch"}]), SOURCE)
    with pytest.raises(ConfigError) as caught:
        build_factory(loaded, Clock())
    assert str(caught.value) == f"{SOURCE}: scanners[1].type: unknown scanner 'nosuch' (available: {available})"


def test_build_factory_bad_scanner_option():
    """A scanner's own error is prefixed with the table's key."""
    loaded = config.parse(with_values(scanners=[{"type": "builtin", "level": 3}]), SOURCE)
    with pytest.raises(ConfigError) as caught:
        build_factory(loaded, Clock())
    assert str(caught.value) == f"{SOURCE}: scanners[0].level: unknown key"


def test_build_factory_unknown_policy():
    """An unknown policy type names the key and lists the available ones."""
    available = ", ".join(sorted(registry.factories(IPolicyFactory)))
    loaded = config.parse(with_values(policy={"type": "lenient"}), SOURCE)
    with pytest.raises(ConfigError) as caught:
        build_factory(loaded, Clock())
    assert str(caught.value) == f"{SOURCE}: policy.type: unknown policy 'lenient' (available: {available})"


def test_build_factory_bad_policy_option():
    """A policy's own error is prefixed with the policy table."""
    loaded = config.parse(with_values(policy={"on_virus": "accept"}), SOURCE)
    with pytest.raises(ConfigError) as caught:
        build_factory(loaded, Clock())
    expected = "policy.on_virus: must be one of replace, reject, discard, pass, got 'accept'"
    assert str(caught.value) == f"{SOURCE}: {expected}"


# -- SIZE and the largest message the scanners take ------------------------------------

CLAMD = {"type": "clamd", "endpoint": "unix:/run/clamav/clamd.ctl"}
CLAMD_LIMIT = SizeLimit(26214400, "scanners[0].stream_max_length", "together with StreamMaxLength in clamd.conf")


def size_with(limit: SizeLimit | None, **server) -> int:
    return config.message_size(config.parse(with_values(server=server), SOURCE), limit)


def test_size_without_scanner_limit_is_max_message_size():
    """Scanners that take any size: SIZE is max_message_size, the default or as set."""
    assert size_with(None) == ServerSettings().max_message_size == 52428800
    assert size_with(None, max_message_size=100_000_000) == 100_000_000


def test_size_not_set_is_the_scanner_limit_when_smaller():
    """max_message_size not set, a scanner that takes 25 MiB: SIZE is 25 MiB."""
    assert size_with(CLAMD_LIMIT) == 26214400


def test_size_not_set_stays_the_default_below_a_larger_scanner_limit():
    """A scanner limit above the default does not raise SIZE beyond the default."""
    assert size_with(SizeLimit(100_000_000, "scanners[0].stream_max_length")) == 52428800


def test_size_set_up_to_the_scanner_limit_is_kept():
    """max_message_size set at or below the scanners' limit is used as it is."""
    assert size_with(CLAMD_LIMIT, max_message_size=10_000_000) == 10_000_000
    assert size_with(CLAMD_LIMIT, max_message_size=26214400) == 26214400


def test_size_set_above_the_scanner_limit_stops_the_start():
    """max_message_size set above what a scanner takes: an error naming the file,
    both keys, both numbers and how to fix it."""
    with pytest.raises(ConfigError) as caught:
        size_with(CLAMD_LIMIT, max_message_size=52428800)
    assert str(caught.value) == (
        f"{SOURCE}: server.max_message_size: 52428800 bytes is more than scanners[0].stream_max_length"
        " (26214400 bytes), the largest message the scanners take: set max_message_size to 26214400 or less,"
        " or raise scanners[0].stream_max_length together with StreamMaxLength in clamd.conf"
    )


def factory_size(**tables) -> int:
    return build_factory(config.parse(with_values(**tables), SOURCE), Clock()).settings.max_message_size


def test_default_config_with_clamd_advertises_its_stream_max_length():
    """The default configuration with a clamd scanner enforces 25 MiB, clamd's
    default StreamMaxLength, not 50 MiB."""
    assert factory_size(scanners=[CLAMD]) == 26214400


def test_builtin_scanner_sets_no_limit():
    """The built-in scanner reads any size (its limits are on decoded content):
    SIZE stays max_message_size."""
    assert factory_size(scanners=[{"type": "builtin"}]) == 52428800


def test_smallest_limit_of_several_scanners_wins():
    """Every [[scanners]] table scans every message: the smallest limit is SIZE."""
    scanners = [{"type": "builtin"}, {**CLAMD, "stream_max_length": "20M"}, {**CLAMD, "endpoint": "tcp:h:3310"}]
    assert factory_size(scanners=scanners) == 20 * 1024 * 1024


def test_build_factory_refuses_max_message_size_above_clamd():
    """The check runs where the scanners are built (start and check-config)."""
    loaded = config.parse(with_values(server={"max_message_size": 52428800}, scanners=[CLAMD]), SOURCE)
    with pytest.raises(ConfigError) as caught:
        build_factory(loaded, Clock())
    assert str(caught.value).startswith(
        f"{SOURCE}: server.max_message_size: 52428800 bytes is more than scanners[0].stream_max_length (26214400 bytes)"
    )


def test_error_names_a_chain_member_by_its_full_key():
    """A clamd inside a chain is named by its full key."""
    chain = {"type": "chain", "scanners": [{"type": "builtin"}, {**CLAMD, "stream_max_length": "1M"}]}
    loaded = config.parse(with_values(server={"max_message_size": 2_000_000}, scanners=[chain]), SOURCE)
    with pytest.raises(ConfigError) as caught:
        build_factory(loaded, Clock())
    assert str(caught.value) == (
        f"{SOURCE}: server.max_message_size: 2000000 bytes is more than scanners[0].scanners[1].stream_max_length"
        " (1048576 bytes), the largest message the scanners take: set max_message_size to 1048576 or less,"
        " or raise scanners[0].scanners[1].stream_max_length together with StreamMaxLength in clamd.conf"
    )


def test_every_listener_enforces_the_same_size():
    """[[listeners]] take SIZE from [server] (they have no key of their own for it)."""
    data = with_values(scanners=[CLAMD], listeners=[{"endpoint": "tcp:2525"}])
    loaded = config.parse(data, SOURCE)
    sizes = [build_factory(loaded, Clock(), listener).settings.max_message_size for listener in loaded.listeners]
    assert sizes == [26214400, 26214400]
    with pytest.raises(ConfigError, match=r"listeners\[0\]\.max_message_size: unknown key"):
        config.parse(with_values(listeners=[{"endpoint": "tcp:2525", "max_message_size": 1}]), SOURCE)
