"""The typed configuration: frozen pydantic models with the project's defaults.

``Config`` and its parts are what the rest of the exporter reads. The YAML
shape of an account (inline values or ``*_file`` paths) is ``AccountInput``;
the loader turns it into an ``AccountConfig`` holding the loaded secrets.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Annotated, Any
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from exporter.budget import BudgetLimits
from exporter.config.secrets import PrivateKey, key_type
from exporter.route import Route

DEFAULT_BASE_URL = "https://papi.binance.com"
ACCOUNT_NAME_PATTERN = r"[A-Za-z0-9_.-]+"
ACCOUNT_NAME_MAX = 64
_ASSET = re.compile(r"[A-Z0-9]{1,32}")
_PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")


def _problem(message: str, **values: Any) -> PydanticCustomError:
    return PydanticCustomError("config", message, values)


# ---- numbers -------------------------------------------------------------


def _not_bool(value: object) -> object:
    # Pydantic would read `true` as 1 in a number field; a typo should fail.
    if isinstance(value, bool):
        raise _problem("must be a number (got {got})", got=str(value).lower())
    return value


def _range(
    *, gt: float | None = None, ge: float | None = None, le: float | None = None
) -> AfterValidator:
    bounds = []
    if gt is not None:
        bounds.append(f"> {gt:g}")
    if ge is not None:
        bounds.append(f">= {ge:g}")
    if le is not None:
        bounds.append(f"<= {le:g}")
    text = "must be " + " and ".join(bounds)

    def check(value: float) -> float:
        ok = (
            math.isfinite(value)
            and (gt is None or value > gt)
            and (ge is None or value >= ge)
            and (le is None or value <= le)
        )
        if not ok:
            raise _problem(text + " (got {got})", got=f"{value:g}")
        return value

    return AfterValidator(check)


_NotBool = BeforeValidator(_not_bool)
_Finite = Field(allow_inf_nan=False)


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


def _check_proxy(value: str) -> str:
    # The URL may carry credentials: messages never quote it.
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


def proxy_without_credentials(proxy: str) -> str:
    """``scheme://host[:port]`` of a proxy URL: user and password removed."""
    parts = urlsplit(proxy)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}"


BaseUrl = Annotated[str, AfterValidator(_check_base_url)]
ProxyUrl = Annotated[str, AfterValidator(_check_proxy)]
IpAddress = Annotated[str, AfterValidator(_check_ip)]
Asset = Annotated[str, AfterValidator(_check_asset)]
AccountName = Annotated[str, AfterValidator(_check_name)]


# ---- settings ------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BinanceSettings(_Frozen):
    """Where and how to call the API."""

    base_url: BaseUrl = DEFAULT_BASE_URL
    recv_window_ms: Annotated[int, _NotBool, _range(ge=1, le=60000)] = 5000
    timeout_seconds: Annotated[float, _NotBool, _Finite, _range(gt=0, le=300)] = 10.0


class BudgetSettings(_Frozen):
    """The request-weight budget (see the README for the arithmetic)."""

    ip_weight_limit_per_minute: Annotated[int, _NotBool, _range(gt=0)] = 6000
    share: Annotated[float, _NotBool, _Finite, _range(gt=0, le=1)] = 0.25
    ip_high_water: Annotated[float, _NotBool, _Finite, _range(gt=0, le=1)] = 0.8
    min_interval_seconds: Annotated[float, _NotBool, _Finite, _range(ge=1, le=86400)] = 10.0

    @property
    def limits(self) -> BudgetLimits:
        """The budget's figures; `limits.per_minute` is B = limit x share."""
        return BudgetLimits(self.ip_weight_limit_per_minute, self.share, self.ip_high_water)


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
    """What to poll besides /papi/v1/balance."""

    account_info: bool = True
    assets: Annotated[AssetFilter, BeforeValidator(_none_as_empty)] = Field(
        default_factory=AssetFilter
    )


# ---- accounts ------------------------------------------------------------


class AccountInput(_Frozen):
    """One account as written in YAML: inline values or ``*_file`` paths.

    Only the shape is checked here; the loader reads the files, checks which
    secrets were given and loads the key.
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

    @model_validator(mode="after")
    def _one_secret(self) -> AccountConfig:
        if (self.api_secret is None) == (self.private_key is None):
            raise _problem("exactly one of api_secret and private_key is required")
        return self

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


class Config(_Sections):
    """The whole configuration."""

    accounts: list[AccountConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        names = [account.name for account in self.accounts]
        if len(set(names)) != len(names):
            raise _problem("account names must be unique")
        return self


class ConfigInput(_Sections):
    """The top level as written in YAML; accounts are checked one by one."""

    accounts: list[Any]
