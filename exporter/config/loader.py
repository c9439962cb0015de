"""Load the YAML file, substitute ``${VAR}``s, validate, read secrets.

Every problem found is collected and raised at once as a ``ConfigError``:
nothing else escapes ``load_config`` or ``parse_config``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, SecretStr, ValidationError

from exporter.budget import refresh_weight
from exporter.config.errors import (
    ConfigError,
    Loc,
    Problem,
    describe_input,
    format_problems,
    problems_from_validation,
)
from exporter.config.interpolate import interpolate
from exporter.config.models import (
    AccountConfig,
    AccountInput,
    AssetFilter,
    BinanceSettings,
    BudgetSettings,
    CollectSettings,
    Config,
    ConfigInput,
)
from exporter.config.secrets import (
    MAX_CONFIG_BYTES,
    PrivateKey,
    SecretSourceError,
    load_private_key,
    read_secret_file,
    read_small_file,
    read_text_secret,
    resolve_path,
)
from exporter.config.yamlfile import YamlError, parse_yaml

# Allowed keys per mapping, for "did you mean" hints on unknown keys.
_KNOWN_KEYS: dict[Loc, list[str]] = {
    (): list(ConfigInput.model_fields),
    ("binance",): list(BinanceSettings.model_fields),
    ("budget",): list(BudgetSettings.model_fields),
    ("collect",): list(CollectSettings.model_fields),
    ("collect", "assets"): list(AssetFilter.model_fields),
}
_ACCOUNT_KEYS: dict[Loc, list[str]] = {(): list(AccountInput.model_fields)}


def load_config(path: Path, environ: Mapping[str, str] = os.environ) -> Config:
    """Read and validate the config file at ``path``; raise ``ConfigError``."""
    shown = str(path)
    try:
        raw = read_small_file(Path(path), MAX_CONFIG_BYTES)
    except SecretSourceError as exc:
        raise ConfigError([f"{shown}: cannot read config file: {exc}"]) from None
    try:
        data = parse_yaml(raw)
    except YamlError as exc:
        raise ConfigError([f"{shown}:{exc.where}: YAML syntax error: {exc.problem}"]) from None
    base_dir = Path(os.path.abspath(path)).parent
    return parse_config(data, environ=environ, base_dir=base_dir)


def parse_config(data: object, *, environ: Mapping[str, str], base_dir: Path) -> Config:
    """Validate already-parsed YAML data; relative file paths are taken from
    ``base_dir``. Raise ``ConfigError`` listing every problem."""
    if not isinstance(data, dict):
        kind = "an empty document" if data is None else describe_input(data, sensitive=True)
        raise ConfigError([f"(top level): must be a mapping of settings (got {kind})"])
    interpolated, problems, failed = interpolate(data, environ)
    assert isinstance(interpolated, dict)
    checked: list[Problem] = []

    top = _validate(ConfigInput, interpolated, (), _KNOWN_KEYS, checked)
    raw_accounts = interpolated.get("accounts")
    accounts: list[AccountConfig] = []
    if "accounts" not in interpolated:
        checked = [p for p in checked if p.loc != ("accounts",)]
        checked.append(Problem(("accounts",), "required (a list of at least one account)"))
    elif isinstance(raw_accounts, list):
        if not raw_accounts:
            checked.append(Problem(("accounts",), "at least one account is required"))
        accounts = _accounts(raw_accounts, base_dir, checked)

    # A value whose ${VAR} failed was replaced by "": its own problems are noise.
    if top is not None:
        checked += _budget_fits(top)
    problems += [p for p in checked if not _under_any(p.loc, failed)]
    if problems or top is None:
        raise ConfigError(format_problems(problems))
    return Config(binance=top.binance, budget=top.budget, collect=top.collect, accounts=accounts)


def _budget_fits(top: ConfigInput) -> list[Problem]:
    """B must pay for at least one whole account refresh a minute."""
    per_minute = top.budget.limits.per_minute
    weight = refresh_weight(top.collect.account_info)
    if per_minute >= weight:
        return []
    return [
        Problem(
            ("budget", "share"),
            f"the budget ip_weight_limit_per_minute x share = {per_minute:g} weight/min "
            f"cannot pay for one account refresh ({weight} weight)",
        )
    ]


def _accounts(
    raw_accounts: list[Any], base_dir: Path, problems: list[Problem]
) -> list[AccountConfig]:
    accounts = []
    first_index: dict[str, int] = {}
    for index, raw in enumerate(raw_accounts):
        loc: Loc = ("accounts", index)
        given = _validate(AccountInput, raw, loc, _ACCOUNT_KEYS, problems)
        if given is None:
            continue
        if given.name in first_index:
            problems.append(
                Problem(
                    (*loc, "name"),
                    f"duplicate account name {given.name!r} "
                    f"(also accounts[{first_index[given.name]}])",
                )
            )
            continue
        first_index[given.name] = index
        account = _resolve_account(given, loc, base_dir, problems)
        if account is not None:
            accounts.append(account)
    return accounts


_M = TypeVar("_M", bound=BaseModel)


def _validate(
    model: type[_M],
    data: object,
    loc: Loc,
    known_keys: dict[Loc, list[str]],
    problems: list[Problem],
) -> _M | None:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems.extend(problems_from_validation(exc, loc, dict(known_keys)))
        return None


def _under_any(loc: Loc, prefixes: set[Loc]) -> bool:
    return any(loc[: len(prefix)] == prefix for prefix in prefixes)


# ---- one account's secrets ------------------------------------------------


def _resolve_account(
    given: AccountInput, loc: Loc, base_dir: Path, problems: list[Problem]
) -> AccountConfig | None:
    """Check which secrets were given, read the files, load the key.

    Returns ``None`` (with the problems appended) when anything fails.
    """
    reader = _SecretReader(given, loc, base_dir, problems)
    before = len(problems)
    key_given, key_field = reader.pick("api_key", "api_key_file")
    hmac_given, secret_field = reader.pick("api_secret", "api_secret_file")
    pem_given, pem_field = reader.pick("private_key", "private_key_file")
    pass_given, pass_field = reader.pick("private_key_passphrase", "private_key_passphrase_file")

    if not key_given:
        problems.append(Problem(loc, "missing api_key (give api_key or api_key_file)"))
    if hmac_given and pem_given:
        problems.append(
            Problem(
                loc,
                "both an HMAC secret (api_secret/api_secret_file) and a private key "
                "(private_key/private_key_file) given (give one)",
            )
        )
    elif not hmac_given and not pem_given:
        problems.append(
            Problem(
                loc,
                "missing secret: give api_secret or api_secret_file (HMAC), "
                "or private_key or private_key_file (RSA or Ed25519)",
            )
        )
    if pass_given and not pem_given:
        problems.append(
            Problem(
                (*loc, pass_field or "private_key_passphrase"),
                "only valid with private_key or private_key_file",
            )
        )

    api_key = reader.text(key_field, strip_all=True) if key_field else None
    if api_key is not None and not _is_header_safe(api_key):
        problems.append(Problem((*loc, str(key_field)), "must be printable ASCII without spaces"))
    api_secret = None
    if secret_field and not pem_given:
        api_secret = reader.text(secret_field, strip_all=True)
    passphrase = None
    if pass_field and pem_given:
        passphrase = reader.text(pass_field, strip_all=False)
    private_key = None
    if pem_field and not hmac_given and (passphrase is not None or not pass_given):
        private_key = reader.private_key(pem_field, passphrase)

    if len(problems) > before or api_key is None:
        return None
    return AccountConfig(
        name=given.name,
        api_key=SecretStr(api_key),
        api_secret=None if api_secret is None else SecretStr(api_secret),
        private_key=private_key,
        proxy=given.proxy,
        source_address=given.source_address,
    )


class _SecretReader:
    """Reads one account's inline or file secrets, reporting problems by field."""

    def __init__(
        self, given: AccountInput, loc: Loc, base_dir: Path, problems: list[Problem]
    ) -> None:
        self._given = given
        self._loc = loc
        self._base_dir = base_dir
        self._problems = problems

    def _value(self, field: str) -> str | None:
        value: str | None = getattr(self._given, field)
        return value

    def pick(self, inline: str, from_file: str) -> tuple[bool, str | None]:
        """``(either given, the field to use)``; both given is a problem and no field."""
        has_inline = self._value(inline) is not None
        has_file = self._value(from_file) is not None
        if has_inline and has_file:
            self._problems.append(
                Problem(self._loc, f"both {inline} and {from_file} given (give one)")
            )
            return True, None
        return has_inline or has_file, inline if has_inline else from_file if has_file else None

    def text(self, field: str, *, strip_all: bool) -> str | None:
        """A secret's text: the inline value, or the file's content."""
        value = self._value(field) or ""
        if field.endswith("_file"):
            try:
                path = resolve_path(value, self._base_dir)
                return read_text_secret(path, strip_all=strip_all)
            except SecretSourceError as exc:
                self._problems.append(Problem((*self._loc, field), str(exc)))
                return None
        if not value.strip():
            self._problems.append(Problem((*self._loc, field), "must not be empty"))
            return None
        return value.strip() if strip_all else value

    def private_key(self, field: str, passphrase: str | None) -> PrivateKey | None:
        """The private key from inline PEM or a PEM file."""
        value = self._value(field) or ""
        try:
            if field.endswith("_file"):
                pem = read_secret_file(resolve_path(value, self._base_dir))
            else:
                pem = value.encode("utf-8", errors="replace")
            password = None if passphrase is None else passphrase.encode("utf-8")
            return load_private_key(pem, password)
        except SecretSourceError as exc:
            self._problems.append(Problem((*self._loc, field), str(exc)))
            return None


def _is_header_safe(value: str) -> bool:
    return all(33 <= ord(char) <= 126 for char in value)
