"""
YAML configuration of the three roles, checked completely before anything starts.

A daemon with a bad configuration must stop at start with one sentence naming the key
and the problem (DESIGN.md section 6), never with a traceback, and never start half
configured.  Unknown keys are errors too: a misspelt C{allow.sensor} silently ignored
would leave a manager open to every sensor.

Relative paths and C{sqlite:///} URLs are relative to the configuration file.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import attr
import yaml

from .messages import IDEF_ALERT
from .store import StoreError, sqlite_path
from .tls import TLSMaterial, TLSSetupError, load_material

if TYPE_CHECKING:
    from .web.config import WebConfig

DEFAULT_PORT = 5603
_DNS = re.compile(r"(?=.{1,253}\Z)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?\Z")
_MEDIA = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+\Z")


class ConfigError(Exception):
    """A configuration that cannot be used; str() is the whole message for the user."""


@attr.s(frozen=True, auto_attribs=True)
class TLSFiles:
    certificate: Path
    key: Path
    ca: Path

    def load(self, where: str) -> TLSMaterial:
        try:
            return load_material(self.certificate, self.key, self.ca)
        except TLSSetupError as e:
            raise ConfigError(f"{where}: tls: {e}") from None


@attr.s(frozen=True, auto_attribs=True)
class ManagerConfig:
    path: Path
    identity: str
    listen: tuple[str, ...]
    tls: TLSFiles
    store: str
    store_path: Path | None  # the SQLite file; None for a postgresql:// store
    allow_sensors: tuple[str, ...]
    allow_networks: tuple[Any, ...]
    setup_timeout: float
    max_content_length: int
    content_types: frozenset[str]
    web_listen: str | None
    dial: tuple[str, ...] = ()
    web: "WebConfig | None" = None  # the whole web: section (iapd.web.config)


@attr.s(frozen=True, auto_attribs=True)
class ProxyConfig:
    path: Path
    identity: str
    listen: tuple[str, ...]
    routes: tuple[tuple[str, str], ...]
    allow_networks: tuple[Any, ...]
    setup_timeout: float
    max_connections: int = 10000
    max_per_source: int = 256


@attr.s(frozen=True, auto_attribs=True)
class SensorConfig:
    path: Path
    identity: str
    manager: str
    connect: str | None
    listen: str | None
    tls: TLSFiles
    window: int
    setup_timeout: float
    ack_timeout: float
    spool: Path | None
    spool_max_bytes: int = 1 << 30
    heartbeat: float = 0.0
    inputs: tuple["InputConfig", ...] = ()
    content_type: str = IDEF_ALERT
    web_listen: str | None = None  # /metrics (spool depth, deliveries)
    web: "WebConfig | None" = None  # the whole web: section (iapd.web.config)


@attr.s(frozen=True, auto_attribs=True)
class InputConfig:
    """One place the sensor daemon takes alerts from."""

    type: str  # directory | socket | eve
    path: Path
    content_type: str = IDEF_ALERT
    mode: int = 0o660  # socket file mode


MANAGER_KEYS = ("identity", "listen", "tls", "store", "allow", "limits", "content_types", "web", "dial")
PROXY_KEYS = ("identity", "listen", "routes", "allow", "limits")
SENSOR_KEYS = (
    "identity", "manager", "connect", "listen", "tls", "spool", "spool_max_bytes", "window", "limits", "inputs",
    "heartbeat", "content_type", "web",
)
INPUT_TYPES = ("directory", "socket", "eve")


class _Reader:
    """Walks one YAML mapping, remembering which keys were used, naming keys in errors."""

    def __init__(self, data: Any, where: str, known: tuple[str, ...], prefix: str = "") -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: {prefix.rstrip('.') or 'the file'} must be a mapping of keys to values")
        self.data, self.where, self.prefix = data, where, prefix
        # a misspelt key is the likeliest cause of any later error: report it first
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise self.fail(unknown[0], f"unknown key (known here: {', '.join(known)})")

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.where}: {self.prefix}{key}: {problem}")

    def get(self, key: str, default: Any = attr.NOTHING) -> Any:
        if key in self.data and self.data[key] is not None:
            return self.data[key]
        if default is attr.NOTHING:
            raise self.fail(key, "is required")
        return default

    def sub(self, key: str, known: tuple[str, ...], required: bool = False) -> "_Reader":
        value = self.get(key, attr.NOTHING if required else {})
        return _Reader(value, self.where, known, f"{self.prefix}{key}.")

    # typed getters -------------------------------------------------------------------

    def hostname(self, key: str, default: Any = attr.NOTHING) -> str:
        value = self.get(key, default)
        if not isinstance(value, str) or not _DNS.match(value):
            raise self.fail(key, f"must be a DNS host name, got {value!r}")
        return value

    def number(self, key: str, default: float, low: float, high: float, unit: str) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
            raise self.fail(key, f"must be a number of {unit} above {low:g} and at most {high:g}, got {value!r}")
        return float(value)

    def integer(self, key: str, default: int, low: int, high: int, unit: str) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(key, f"must be a whole number of {unit} from {low} to {high}, got {value!r}")
        return value

    def strings(self, key: str, default: Any, check: Callable[[str], str | None] | None = None) -> tuple[str, ...]:
        value = self.get(key, default)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, f"must be a list of strings, got {value!r}")
        if check is not None:
            for item in value:
                problem = check(item)
                if problem:
                    raise self.fail(key, f"{item!r}: {problem}")
        return tuple(value)

    def path(self, key: str, base: Path, default: Any = attr.NOTHING) -> Path:
        value = self.get(key, default)
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"must be a file path, got {value!r}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p

    def tls(self, base: Path) -> TLSFiles:
        tls = self.sub("tls", ("certificate", "key", "ca"), required=True)
        return TLSFiles(tls.path("certificate", base), tls.path("key", base), tls.path("ca", base))


def _load_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read configuration: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: configuration is not UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}: not valid YAML{at}: {problem}") from None


def endpoint_problem(kind: str) -> Callable[[str], str | None]:
    """
    A checker for Twisted endpoint strings of C{kind} ("server" or "client"): a typo in
    an endpoint must stop the daemon at start with the key named, not at listen time.
    """
    def check(text: str) -> str | None:
        from twisted.internet import endpoints, reactor

        try:
            if kind == "server":
                endpoints.serverFromString(reactor, text)
            else:
                endpoints.clientFromString(reactor, text)
        except (ValueError, TypeError, KeyError) as e:
            return f"not a Twisted {kind} endpoint string ({e or type(e).__name__})"
        return None

    return check


def _network(text: str) -> str | None:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError as e:
        return f"not a network in CIDR form ({e})"
    return None


def _media_type(text: str) -> str | None:
    return None if _MEDIA.match(text.lower()) else "not a media type like application/x-idef-alert"


def _one_endpoint(reader: _Reader, key: str, kind: str) -> str | None:
    value = reader.get(key, None)
    if value is None:
        return None
    if not isinstance(value, str):
        raise reader.fail(key, f"must be one {kind} endpoint string, got {value!r}")
    problem = endpoint_problem(kind)(value)
    if problem:
        raise reader.fail(key, f"{value!r}: {problem}")
    return value


def load_manager(path: Path) -> ManagerConfig:
    path = Path(path)
    where = str(path)
    base = path.resolve().parent
    top = _Reader(_load_yaml(path), where, MANAGER_KEYS)
    identity = top.hostname("identity")
    listen = top.strings("listen", [f"tcp:{DEFAULT_PORT}"], endpoint_problem("server"))
    if not listen:
        raise top.fail("listen", "must name at least one endpoint")
    tls = top.tls(base)
    store = top.get("store", "sqlite:///alerts.db")
    if not isinstance(store, str):
        raise top.fail("store", f"must be a store URL, got {store!r}")
    store_path: Path | None = None  # None: a PostgreSQL store, named by the URL alone
    if store.startswith(("postgresql:", "postgres:")):
        from .pgstore import url_problem

        problem = url_problem(store)
        if problem:
            raise top.fail("store", problem)
    else:
        try:
            store_path = sqlite_path(store, base)
        except StoreError as e:
            raise top.fail("store", str(e)) from None
    allow = top.sub("allow", ("sensors", "networks"))
    sensors = allow.strings("sensors", ["*"])
    networks = allow.strings("networks", ["0.0.0.0/0", "::/0"], _network)
    limits = top.sub("limits", ("setup_timeout", "max_content_length"))
    setup_timeout = limits.number("setup_timeout", 10, 0, 3600, "seconds")
    max_len = limits.integer("max_content_length", 1048576, 1, 1 << 30, "octets")
    content_types = top.strings("content_types", [IDEF_ALERT], _media_type)
    from .web.config import load_web

    web = load_web(top, base, tls.ca)
    dial = top.strings("dial", [], endpoint_problem("client"))
    return ManagerConfig(
        path=path,
        identity=identity,
        listen=listen,
        tls=tls,
        store=store,
        store_path=store_path,
        allow_sensors=tuple(s.lower() for s in sensors),
        allow_networks=tuple(ipaddress.ip_network(n, strict=False) for n in networks),
        setup_timeout=setup_timeout,
        max_content_length=max_len,
        content_types=frozenset(t.lower() for t in content_types),
        web_listen=web.listen if web is not None else None,
        dial=dial,
        web=web,
    )


def load_sensor(path: Path) -> SensorConfig:
    path = Path(path)
    where = str(path)
    base = path.resolve().parent
    top = _Reader(_load_yaml(path), where, SENSOR_KEYS)
    identity = top.hostname("identity")
    manager = top.hostname("manager")
    connect = _one_endpoint(top, "connect", "client")
    listen = _one_endpoint(top, "listen", "server")
    if connect is None and listen is None:
        raise top.fail("connect", "is required unless listen is set (the first hop: the manager or a proxy)")
    tls = top.tls(base)
    spool = top.path("spool", base, None) if top.get("spool", None) is not None else None
    spool_max_bytes = top.integer("spool_max_bytes", 1 << 30, 1 << 20, 1 << 40, "octets")
    window = top.integer("window", 256, 1, 65536, "alerts")
    limits = top.sub("limits", ("setup_timeout", "ack_timeout"))
    setup_timeout = limits.number("setup_timeout", 10, 0, 3600, "seconds")
    ack_timeout = limits.number("ack_timeout", 60, 0, 86400, "seconds")
    heartbeat = top.get("heartbeat", 0)
    if isinstance(heartbeat, bool) or not isinstance(heartbeat, (int, float)) or not 0 <= heartbeat <= 86400:
        raise top.fail("heartbeat", f"must be seconds between heartbeats (0 for none, at most 86400), got {heartbeat!r}")
    content_type = top.get("content_type", IDEF_ALERT)
    if not isinstance(content_type, str) or _media_type(content_type):
        raise top.fail("content_type", f"must be a media type like {IDEF_ALERT}, got {content_type!r}")
    raw_inputs = top.get("inputs", [])
    if not isinstance(raw_inputs, list):
        raise top.fail("inputs", f"must be a list, got {raw_inputs!r}")
    inputs = []
    for i, item in enumerate(raw_inputs):
        entry = _Reader(item, where, ("type", "path", "content_type", "mode"), f"inputs[{i}].")
        kind = entry.get("type")
        if kind not in INPUT_TYPES:
            raise entry.fail("type", f"must be one of {', '.join(INPUT_TYPES)}, got {kind!r}")
        ct = entry.get("content_type", content_type)
        if not isinstance(ct, str) or _media_type(ct):
            raise entry.fail("content_type", f"must be a media type, got {ct!r}")
        mode = entry.get("mode", 0o660)
        if isinstance(mode, str) and re.fullmatch(r"0?[0-7]{3}", mode):
            mode = int(mode, 8)
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
            raise entry.fail("mode", f"must be a file mode such as '0660', got {mode!r}")
        inputs.append(InputConfig(kind, entry.path("path", base), ct, mode))
    if inputs and spool is None:
        raise top.fail("spool", "is required when inputs are configured: accepted alerts are kept there")
    from .web.config import load_web

    web = load_web(top, base, tls.ca, own_tls=None, shows="its /metrics tell the sensor's spool and deliveries")
    return SensorConfig(
        path=path, identity=identity, manager=manager, connect=connect, listen=listen, tls=tls,
        window=window, setup_timeout=setup_timeout, ack_timeout=ack_timeout, spool=spool,
        spool_max_bytes=spool_max_bytes, heartbeat=float(heartbeat), inputs=tuple(inputs),
        content_type=content_type, web_listen=web.listen if web is not None else None, web=web,
    )


def load_proxy(path: Path) -> ProxyConfig:
    path = Path(path)
    where = str(path)
    top = _Reader(_load_yaml(path), where, PROXY_KEYS)
    identity = top.hostname("identity")
    listen = top.strings("listen", [f"tcp:{DEFAULT_PORT}"], endpoint_problem("server"))
    if not listen:
        raise top.fail("listen", "must name at least one endpoint")
    raw_routes = top.get("routes")
    if not isinstance(raw_routes, list) or not raw_routes:
        raise top.fail("routes", "must be a non-empty list of {match: GLOB, upstream: ENDPOINT}; "
                       "a proxy without routes would refuse everything")
    routes = []
    for i, item in enumerate(raw_routes):
        route = _Reader(item, where, ("match", "upstream"), f"routes[{i}].")
        match = route.get("match")
        if not isinstance(match, str) or not match:
            raise route.fail("match", f"must be a host glob such as '*.example.org', got {match!r}")
        upstream = route.strings("upstream", attr.NOTHING, endpoint_problem("client"))
        if len(upstream) != 1:
            raise route.fail("upstream", "must be one client endpoint string")
        routes.append((match, upstream[0]))
    allow = top.sub("allow", ("networks",))
    networks = allow.strings("networks", ["0.0.0.0/0", "::/0"], _network)
    limits = top.sub("limits", ("setup_timeout", "max_connections", "max_per_source"))
    setup_timeout = limits.number("setup_timeout", 10, 0, 3600, "seconds")
    max_connections = limits.integer("max_connections", 10000, 1, 1_000_000, "connections")
    max_per_source = limits.integer("max_per_source", 256, 1, 1_000_000, "connections")
    return ProxyConfig(
        max_connections=max_connections,
        max_per_source=max_per_source,
        path=path,
        identity=identity,
        listen=listen,
        routes=tuple(routes),
        allow_networks=tuple(ipaddress.ip_network(n, strict=False) for n in networks),
        setup_timeout=setup_timeout,
    )
