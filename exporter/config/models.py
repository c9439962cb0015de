"""The typed configuration: frozen pydantic models with the project's defaults.

``Config`` and its parts are what the rest of the exporter reads. The YAML
shape of an account (inline values or ``*_file`` paths) is ``AccountInput``;
the loader turns it into an ``AccountConfig`` holding the loaded secrets.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, TypeGuard
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from exporter.config.errors import KEY_HEAD
from exporter.config.secrets import PrivateKey, key_type
from exporter.route import Route

DEFAULT_BASE_URL = "https://papi.binance.com"
DEFAULT_PRICES_BASE_URL = "https://api.binance.com"
#: counted as 1 USD each: the quote currencies of the valuation rule (USDT, USDC, FDUSD),
#: and Binance's USD tokens that have no spot pair and are subscribed and redeemed 1:1
#: (BFUSD, RWUSD); the README says why these and not more
DEFAULT_USD_ASSETS = ("USDT", "USDC", "FDUSD", "BFUSD", "RWUSD")
DEFAULT_STREAM_URL = "wss://fstream.binance.com/pm/ws"
#: the USD-M futures API, asked only for the server time (GET /fapi/v1/time)
DEFAULT_FUTURES_BASE_URL = "https://fapi.binance.com"
#: the stream's documented path (an account's stream is <it>/<listenKey>), and the
#: official SDKs' base (the docs' "Base Url"), which a user may paste: read as the former
STREAM_PATH = "/pm/ws"
SDK_STREAM_PATH = "/pm"
ACCOUNT_NAME_PATTERN = r"[A-Za-z0-9_.-]+"
ACCOUNT_NAME_MAX = 64
_ASSET = re.compile(r"[A-Z0-9]{1,32}")
_PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")
#: an account's own labels (accounts[].labels): Prometheus label syntax, at most this many
LABEL_NAME_PATTERN = r"[a-zA-Z_][a-zA-Z0-9_]*"
MAX_ACCOUNT_LABELS = 8
LABEL_VALUE_MAX = 128
#: label names an account's labels may not take: the exporter's own, the target's and the
#: alerts' (a join would clash with them), and Prometheus's reserved __ prefix
RESERVED_LABELS = frozenset(
    {
        "account",
        "asset",
        "egress",
        "endpoint",
        "event",
        "outcome",
        "reason",
        "status",
        "threshold",
        "version",
        "job",
        "instance",
        "alertname",
        "severity",
        "le",
        "quantile",
    }
)


def _problem(message: str, **values: Any) -> PydanticCustomError:
    return PydanticCustomError("config", message, values)


# ---- numbers -------------------------------------------------------------


def _not_bool(value: object) -> object:
    # Pydantic's lax mode reads `true` as 1 in a number field, and strict mode would
    # also refuse "${VAR}" numbers (strings): a typo should fail, a variable should not.
    if isinstance(value, bool):
        raise _problem("must be a number (got {got})", got=str(value).lower())
    return value


_NotBool = BeforeValidator(_not_bool)


def _none_as_empty(value: object) -> object:
    # `binance:` with every child commented out is YAML null: use the defaults.
    return {} if value is None else value


def _none_as_empty_list(value: object) -> object:
    return [] if value is None else value


# ---- URLs and addresses --------------------------------------------------


def _split_url(value: str) -> SplitResult:
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        raise _problem("not a valid URL") from None
    if not parts.hostname:
        raise _problem("not a valid URL: no host")
    if parts.query or parts.fragment:
        raise _problem("must not have a query or fragment")
    return parts


def _check_base_url(value: str) -> str:
    parts = _split_url(value.strip())
    if parts.scheme not in ("http", "https"):
        raise _problem("must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise _problem("must not contain credentials")
    return parts.geturl().rstrip("/")


def _check_stream_url(value: str) -> str:
    """The stream's root, to which `/<listenKey>` is appended: its path must end in the
    documented `/pm/ws`; the SDKs' `/pm` becomes `/pm/ws`. Anything else cannot work
    (`/pm/<key>` and `/pm/stream/<key>` are not streams), and says which form is."""
    parts = _split_url(value.strip())
    if parts.scheme not in ("ws", "wss"):
        raise _problem("must be a ws:// or wss:// URL")
    if parts.username is not None or parts.password is not None:
        raise _problem("must not contain credentials")
    url = parts.geturl().rstrip("/")
    path = parts.path.rstrip("/")
    if path.endswith(SDK_STREAM_PATH):
        return url + STREAM_PATH.removeprefix(SDK_STREAM_PATH)
    if not path.endswith(STREAM_PATH):
        raise _problem(
            f"must be the user data stream's root {DEFAULT_STREAM_URL} (the documented form;"
            " the SDKs' wss://fstream.binance.com/pm is read as it), without the listenKey"
        )
    return url


#: what RFC 3986 allows unencoded in a URL's user name and password
_USERINFO_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=%"
)
_PERCENT_ENCODE = "percent-encode it (e.g. @ as %40, / as %2F, # as %23, : as %3A)"


def _proxy_problem(value: str) -> str | None:
    """Which part of a proxy URL does not parse, named without quoting it (the URL may
    carry credentials); None when no part is at fault."""
    scheme, separator, rest = value.partition("://")
    if not separator or not scheme:
        return "not a valid URL: no scheme (write http://host:port)"
    at = rest.rfind("@")
    if at >= 0:
        user, has_password, password = rest[:at].partition(":")
        if not set(user) <= _USERINFO_CHARS:
            return f"not a valid URL: the user name has a reserved character: {_PERCENT_ENCODE}"
        if has_password and not set(password) <= _USERINFO_CHARS:
            return f"not a valid URL: the password has a reserved character: {_PERCENT_ENCODE}"
        rest = rest[at + 1 :]
    host_port = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    host, port = host_port, ""
    if host_port.startswith("["):
        end = host_port.find("]")
        host, port = host_port[: end + 1], host_port[end + 1 :].removeprefix(":")
    elif ":" in host_port:
        host, _, port = host_port.rpartition(":")
    if not host or host == "[]":
        return "not a valid URL: no host"
    if ":" in host_port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        return "not a valid URL: the port is not a number from 1 to 65535"
    return None


def _check_proxy(value: str) -> str:
    # The URL may carry credentials: messages never quote it.
    problem = _proxy_problem(value.strip())
    if problem is not None:
        raise _problem(problem)
    parts = _split_url(value.strip())
    if parts.scheme not in _PROXY_SCHEMES:
        raise _problem("must be an http://, https://, socks5:// or socks5h:// URL")
    if parts.path not in ("", "/"):
        raise _problem("must not have a path")
    return value.strip()


def _check_ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise _problem("not an IP address (IPv4 or IPv6)") from None


def _check_asset(value: str) -> str:
    asset = value.strip().upper()
    if not _ASSET.fullmatch(asset):
        raise _problem("not an asset symbol (letters and digits, e.g. BTC)")
    return asset


def _check_name(value: str) -> str:
    if not value:
        raise _problem("must not be empty")
    if len(value) > ACCOUNT_NAME_MAX:
        raise _problem(f"longer than {ACCOUNT_NAME_MAX} characters")
    if not re.fullmatch(ACCOUNT_NAME_PATTERN, value):
        raise _problem(f"must match {ACCOUNT_NAME_PATTERN} (letters, digits, _ . -)")
    return value


def _check_labels(labels: dict[str, str]) -> dict[str, str]:
    if len(labels) > MAX_ACCOUNT_LABELS:
        raise _problem(f"at most {MAX_ACCOUNT_LABELS} labels (got {len(labels)})")
    for name, value in labels.items():
        shown = repr(name) if len(name) <= ACCOUNT_NAME_MAX else f"{name[:KEY_HEAD]!r}..."
        if not re.fullmatch(LABEL_NAME_PATTERN, name):
            raise _problem(
                f"label name {shown} is not a Prometheus label name"
                f" (letters, digits and _, not starting with a digit)"
            )
        if name.startswith("__"):
            raise _problem(f"label name {shown} is reserved (names starting with __ are)")
        if name in RESERVED_LABELS:
            raise _problem(
                f"label name {shown} is reserved (the exporter, Prometheus or the alerts use it)"
            )
        if not value.strip():
            raise _problem(f"label {shown} must not be empty")
        if len(value) > LABEL_VALUE_MAX or not value.isprintable():
            raise _problem(f"label {shown}: at most {LABEL_VALUE_MAX} printable characters")
    return labels


def proxy_without_credentials(proxy: str) -> str:
    """``scheme://host[:port]`` of a proxy URL: user and password removed."""
    parts = urlsplit(proxy)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}"


def _is_name(value: object) -> TypeGuard[str]:
    try:
        return isinstance(value, str) and _check_name(value) == value
    except PydanticCustomError:
        return False


BaseUrl = Annotated[str, AfterValidator(_check_base_url)]
StreamUrl = Annotated[str, AfterValidator(_check_stream_url)]
ProxyUrl = Annotated[str, AfterValidator(_check_proxy)]
IpAddress = Annotated[str, AfterValidator(_check_ip)]
Asset = Annotated[str, AfterValidator(_check_asset)]
AccountName = Annotated[str, AfterValidator(_check_name)]
AccountLabels = Annotated[
    dict[str, str], BeforeValidator(_none_as_empty), AfterValidator(_check_labels)
]


# ---- settings ------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BinanceSettings(_Frozen):
    """Where and how to call the API."""

    base_url: BaseUrl = DEFAULT_BASE_URL
    #: the user data stream's root; an account's listenKey is appended as /<listenKey>
    stream_url: StreamUrl = DEFAULT_STREAM_URL
    #: the USD-M futures API, asked only for the server time; None: Binance's when
    #: base_url is Binance's, else base_url (a simulator or gateway serving every host)
    futures_base_url: BaseUrl | None = None
    recv_window_ms: Annotated[int, Field(ge=1, le=60000), _NotBool] = 5000
    timeout_seconds: Annotated[float, Field(gt=0, le=300, allow_inf_nan=False), _NotBool] = 10.0

    @property
    def futures_url(self) -> str:
        """Where the server time is read first (`GET /fapi/v1/time`)."""
        if self.futures_base_url is not None:
            return self.futures_base_url
        return DEFAULT_FUTURES_BASE_URL if self.base_url == DEFAULT_BASE_URL else self.base_url


class BudgetSettings(_Frozen):
    """The request-weight budget (see the README for the arithmetic)."""

    ip_weight_limit_per_minute: Annotated[int, Field(gt=0), _NotBool] = 6000
    share: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False), _NotBool] = 0.25
    ip_high_water: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False), _NotBool] = 0.8
    min_interval_seconds: Annotated[float, Field(ge=1, le=86400, allow_inf_nan=False), _NotBool] = (
        10.0
    )


class StreamSettings(_Frozen):
    """The user data stream: events trigger refreshes ahead of the round-robin."""

    enabled: bool = True
    #: at most one event-triggered refresh of an account per this many seconds
    min_refresh_interval_seconds: Annotated[
        float, Field(ge=0.5, le=3600, allow_inf_nan=False), _NotBool
    ] = 2.0


class AssetFilter(_Frozen):
    """Which assets to export: ``include`` empty means all; ``exclude`` wins."""

    include: Annotated[list[Asset], BeforeValidator(_none_as_empty_list)] = Field(
        default_factory=list
    )
    exclude: Annotated[list[Asset], BeforeValidator(_none_as_empty_list)] = Field(
        default_factory=list
    )

    @model_validator(mode="after")
    def _disjoint(self) -> AssetFilter:
        both = sorted(set(self.include) & set(self.exclude))
        if both:
            raise _problem(
                "{assets} in both include and exclude (choose one)", assets=", ".join(both)
            )
        return self

    def allows(self, asset: str) -> bool:
        """True when series for ``asset`` should be exported."""
        symbol = asset.upper()
        if symbol in self.exclude:
            return False
        return not self.include or symbol in self.include


class CollectSettings(_Frozen):
    """What to poll besides /papi/v1/balance: each switch turns on the collector of its
    name (exporter/collectors/), `positions` the margin collectors' position series."""

    account_info: bool = True
    um_account: bool = False
    cm_account: bool = False
    positions: bool = True
    assets: Annotated[AssetFilter, BeforeValidator(_none_as_empty)] = Field(
        default_factory=AssetFilter
    )

    def switches(self) -> dict[str, bool]:
        """Every on/off switch by name (`collect.<name>`), for the collector registry."""
        return {name: value for name, value in self.model_dump().items() if isinstance(value, bool)}


class PricesSettings(_Frozen):
    """The spot price source that lets Prometheus value every asset in USD."""

    enabled: bool = True
    base_url: BaseUrl = DEFAULT_PRICES_BASE_URL
    interval_seconds: Annotated[float, Field(ge=5, le=3600, allow_inf_nan=False), _NotBool] = 30.0
    usd_assets: Annotated[list[Asset], Field(min_length=1)] = Field(
        default_factory=lambda: list(DEFAULT_USD_ASSETS)
    )
    proxy: ProxyUrl | None = Field(default=None, repr=False)
    source_address: IpAddress | None = None

    @property
    def route(self) -> Route:
        """Where price requests go: the default route unless proxy/source_address say so."""
        return Route(self.proxy, self.source_address)

    @field_serializer("proxy")
    def _dump_proxy(self, proxy: str | None) -> str | None:
        return None if proxy is None else proxy_without_credentials(proxy)


# ---- accounts ------------------------------------------------------------

#: a uniMMR threshold: Binance liquidates at uniMMR <= 1.05, so only above 1 means anything
UniMMR = Annotated[float | None, Field(gt=1, le=1000, allow_inf_nan=False), _NotBool]


class Thresholds(_Frozen):
    """An account's own alert thresholds, exported as binance_pm_account_threshold; the
    alert rules use them in place of their global defaults."""

    uni_mmr_warning: UniMMR = None
    uni_mmr_critical: UniMMR = None

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        warning, critical = self.uni_mmr_warning, self.uni_mmr_critical
        if warning is not None and critical is not None and critical >= warning:
            raise _problem(
                "uni_mmr_critical must be below uni_mmr_warning (an account is critical"
                " below the lower one)"
            )
        return self

    def given(self) -> dict[str, float]:
        """The thresholds set, by name."""
        return {name: value for name, value in self.model_dump().items() if value is not None}


class AccountInput(_Frozen):
    """One account as written in YAML: inline values or ``*_file`` paths.

    The shape and which secrets were given are checked here; the loader reads
    the files and loads the key.
    """

    name: AccountName
    api_key: str | None = None
    api_key_file: str | None = None
    api_secret: str | None = None
    api_secret_file: str | None = None
    private_key: str | None = None
    private_key_file: str | None = None
    private_key_passphrase: str | None = None
    private_key_passphrase_file: str | None = None
    proxy: ProxyUrl | None = None
    source_address: IpAddress | None = None
    labels: AccountLabels = Field(default_factory=dict)
    thresholds: Annotated[Thresholds, BeforeValidator(_none_as_empty)] = Field(
        default_factory=Thresholds
    )

    @model_validator(mode="after")
    def _one_of_each(self) -> AccountInput:
        """One API key; one HMAC secret or one private key; a passphrase only with a key."""
        problems: list[InitErrorDetails] = []

        def problem(message: str, *loc: str) -> None:
            problems.append(InitErrorDetails(type=_problem(message), loc=loc, input=None))

        def one_of(inline: str, from_file: str) -> bool:
            has_inline, has_file = self.given(inline), self.given(from_file)
            if has_inline and has_file:
                problem(f"both {inline} and {from_file} given (give one)")
            return has_inline or has_file

        key = one_of("api_key", "api_key_file")
        hmac = one_of("api_secret", "api_secret_file")
        pem = one_of("private_key", "private_key_file")
        passphrase = one_of("private_key_passphrase", "private_key_passphrase_file")
        if not key:
            problem("missing api_key (give api_key or api_key_file)")
        if hmac and pem:
            problem(
                "both an HMAC secret (api_secret/api_secret_file) and a private key "
                "(private_key/private_key_file) given (give one)"
            )
        elif not hmac and not pem:
            problem(
                "missing secret: give api_secret or api_secret_file (HMAC), "
                "or private_key or private_key_file (RSA or Ed25519)"
            )
        if passphrase and not pem:
            inline = self.given("private_key_passphrase")
            field = "private_key_passphrase" if inline else "private_key_passphrase_file"
            problem("only valid with private_key or private_key_file", field)
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, problems)
        return self

    def given(self, field: str) -> bool:
        """Whether the YAML gave this field."""
        return getattr(self, field) is not None


class AccountConfig(_Frozen):
    """One account, secrets loaded. Nothing here prints a secret.

    Exactly one of ``api_secret`` (HMAC) and ``private_key`` (RSA or Ed25519)
    is set. ``proxy`` may hold credentials: it is left out of the repr and
    dumped without them; ``route.label`` names the route in logs and labels.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    name: AccountName
    api_key: SecretStr
    api_secret: SecretStr | None = None
    private_key: PrivateKey | None = Field(default=None, repr=False)
    proxy: ProxyUrl | None = Field(default=None, repr=False)
    source_address: IpAddress | None = None
    #: the account's own labels, exported once, on binance_pm_account_info
    labels: AccountLabels = Field(default_factory=dict)
    thresholds: Thresholds = Field(default_factory=Thresholds)

    @property
    def key_type(self) -> str:
        """``"hmac"``, ``"rsa"`` or ``"ed25519"``: how requests are signed."""
        return key_type(self.private_key)

    @property
    def route(self) -> Route:
        """Where this account's requests go; accounts on one route share a client and a
        weight budget (Binance counts weight per IP)."""
        return Route(self.proxy, self.source_address)

    @field_serializer("private_key")
    def _dump_key(self, key: PrivateKey | None) -> str | None:
        return None if key is None else f"<{key_type(key)} private key>"

    @field_serializer("proxy")
    def _dump_proxy(self, proxy: str | None) -> str | None:
        return None if proxy is None else proxy_without_credentials(proxy)


class _Sections(_Frozen):
    """The settings every account shares."""

    binance: Annotated[BinanceSettings, BeforeValidator(_none_as_empty)] = Field(
        default_factory=BinanceSettings
    )
    budget: Annotated[BudgetSettings, BeforeValidator(_none_as_empty)] = Field(
        default_factory=BudgetSettings
    )
    collect: Annotated[CollectSettings, BeforeValidator(_none_as_empty)] = Field(
        default_factory=CollectSettings
    )
    prices: Annotated[PricesSettings, BeforeValidator(_none_as_empty)] = Field(
        default_factory=PricesSettings
    )
    stream: Annotated[StreamSettings, BeforeValidator(_none_as_empty)] = Field(
        default_factory=StreamSettings
    )


class Config(_Sections):
    """The whole configuration: the accounts of ``accounts`` and then those of the files in
    ``accounts_dir``, each group in its order."""

    accounts: list[AccountConfig] = Field(min_length=1)
    #: the directory whose *.yaml files hold more accounts (absolute), if any
    accounts_dir: str | None = None


class ConfigInput(_Sections):
    """The top level as written in YAML; the loader checks the accounts one by one."""

    accounts: Annotated[list[Any], BeforeValidator(_none_as_empty_list)] = Field(
        default_factory=list
    )
    accounts_dir: str | None = None

    @field_validator("accounts")
    @classmethod
    def _unique_names(cls, accounts: list[Any]) -> list[Any]:
        first: dict[str, int] = {}
        problems = []
        for index, account in enumerate(accounts):
            name = account.get("name") if isinstance(account, dict) else None
            if not _is_name(name):
                continue  # the account's own check says what is wrong with it
            if name in first:
                message = "duplicate account name {name} (also accounts[{first}])"
                error = _problem(message, name=repr(name), first=first[name])
                problems.append(InitErrorDetails(type=error, loc=(index, "name"), input=None))
            else:
                first[name] = index
        if problems:
            raise ValidationError.from_exception_data(cls.__name__, problems)
        return accounts
