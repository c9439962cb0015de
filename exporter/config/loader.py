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

from exporter.config.errors import (
    ConfigError,
    Loc,
    Problem,
    describe_input,
    field_names,
    format_problems,
    problems_from_validation,
)
from exporter.config.interpolate import interpolate
from exporter.config.models import AccountConfig, AccountInput, Config, ConfigInput
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

#: the keys a message may show whole (any other key may be a secret pasted as a key)
_FIELD_NAMES = field_names(ConfigInput, AccountInput)


def load_config(path: Path, environ: Mapping[str, str] = os.environ) -> Config:
    """Read and validate the config file at ``path``; raise ``ConfigError``."""
    shown = str(path)
    try:
        raw = read_small_file(Path(path), MAX_CONFIG_BYTES)
    except SecretSourceError as exc:
        raise ConfigError([f"{shown}: cannot read config file: {exc}"]) from None
    try:
        data = parse_yaml(raw, _FIELD_NAMES)
    except YamlError as exc:
        raise ConfigError([f"{shown}:{exc}"]) from None
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

    top = _validate(ConfigInput, interpolated, (), checked)
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
    problems += [p for p in checked if not _under_any(p.loc, failed)]
    if problems or top is None:
        raise ConfigError(format_problems(problems, _FIELD_NAMES))
    sections = {name: getattr(top, name) for name in Config.model_fields if name != "accounts"}
    return Config(**sections, accounts=accounts)


def _accounts(
    raw_accounts: list[Any], base_dir: Path, problems: list[Problem]
) -> list[AccountConfig]:
    accounts = []
    for index, raw in enumerate(raw_accounts):
        loc: Loc = ("accounts", index)
        given = _validate(AccountInput, raw, loc, problems)
        account = None if given is None else _resolve_account(given, loc, base_dir, problems)
        if account is not None:
            accounts.append(account)
    return accounts


_M = TypeVar("_M", bound=BaseModel)


def _validate(model: type[_M], data: object, loc: Loc, problems: list[Problem]) -> _M | None:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems.extend(problems_from_validation(exc, model, loc))
        return None


def _under_any(loc: Loc, prefixes: set[Loc]) -> bool:
    return any(loc[: len(prefix)] == prefix for prefix in prefixes)


# ---- one account's secrets ------------------------------------------------


def _resolve_account(
    given: AccountInput, loc: Loc, base_dir: Path, problems: list[Problem]
) -> AccountConfig | None:
    """Read the secret files and load the key; ``AccountInput`` has checked which
    secrets were given. Returns ``None`` (with the problems appended) when anything fails."""
    reader = _SecretReader(given, loc, base_dir, problems)
    before = len(problems)
    api_key = reader.text(reader.pick("api_key"), strip_all=True)
    if api_key is not None and not _is_header_safe(api_key):
        problems.append(
            Problem((*loc, reader.pick("api_key")), "must be printable ASCII without spaces")
        )
    api_secret = private_key = None
    if given.given("api_secret") or given.given("api_secret_file"):
        api_secret = reader.text(reader.pick("api_secret"), strip_all=True)
    else:
        passphrase = None
        if given.given("private_key_passphrase") or given.given("private_key_passphrase_file"):
            passphrase = reader.text(reader.pick("private_key_passphrase"), strip_all=False)
            if passphrase is None:
                return None
        private_key = reader.private_key(reader.pick("private_key"), passphrase)
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

    def pick(self, inline: str) -> str:
        """The field that gives this secret: ``inline`` or ``inline + "_file"``."""
        return inline if self._given.given(inline) else f"{inline}_file"

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
