"""Load the YAML file, substitute ``${VAR}``s, validate, read secrets.

Every problem found is collected and raised at once as a ``ConfigError``:
nothing else escapes ``load_config`` or ``parse_config``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
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
    """Read and validate the config file at ``path``; raise ``ConfigError``.

    Every problem names the file it is in, once: ``config.yaml: accounts[0].name: ...``,
    ``config.yaml:21:2: YAML syntax error: ...``, ``accounts.d/a.yaml: api_key: ...``.
    """
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
    config, problems, elsewhere = _parse(data, environ, base_dir)
    if config is None:
        raise ConfigError([f"{shown}: {line}" for line in problems] + elsewhere)
    return config


def parse_config(data: object, *, environ: Mapping[str, str], base_dir: Path) -> Config:
    """Validate already-parsed YAML data; relative file paths are taken from
    ``base_dir``. Raise ``ConfigError`` listing every problem (those of the files in
    ``accounts_dir`` name their file)."""
    config, problems, elsewhere = _parse(data, environ, base_dir)
    if config is None:
        raise ConfigError(problems + elsewhere)
    return config


def _parse(
    data: object, environ: Mapping[str, str], base_dir: Path
) -> tuple[Config | None, list[str], list[str]]:
    """``(config, problems of the document, problems of the account files)``; the config
    is None when there is any problem."""
    if not isinstance(data, dict):
        kind = "an empty document" if data is None else describe_input(data, sensitive=True)
        return None, [f"(top level): must be a mapping of settings (got {kind})"], []
    interpolated, problems, failed = interpolate(data, environ)
    assert isinstance(interpolated, dict)
    checked: list[Problem] = []

    top = _validate(ConfigInput, interpolated, (), checked)
    raw_accounts = interpolated.get("accounts")
    accounts: list[Sourced] = []
    if isinstance(raw_accounts, list):
        accounts = [
            Sourced(account, f"the config's accounts[{index}]")
            for index, account in _accounts(raw_accounts, ("accounts",), base_dir, checked)
        ]
    directory = None
    elsewhere: list[str] = []
    if top is not None and top.accounts_dir is not None and ("accounts_dir",) not in failed:
        directory = resolve_path(top.accounts_dir, base_dir)
        from_files, elsewhere = read_accounts_dir(directory, environ, checked)
        accounts += from_files
    if "accounts" not in interpolated and "accounts_dir" not in interpolated:
        checked = [p for p in checked if p.loc != ("accounts",)]
        checked.append(
            Problem(("accounts",), "required (a list of at least one account, or accounts_dir)")
        )
    elif top is not None and not accounts and not checked and not elsewhere and not problems:
        where = "accounts" if directory is None else "accounts_dir"
        checked.append(Problem((where,), "at least one account is required"))
    elsewhere += _duplicates(accounts)

    # A value whose ${VAR} failed was replaced by "": its own problems are noise.
    problems += [p for p in checked if not _under_any(p.loc, failed)]
    if problems or elsewhere or top is None:
        return None, format_problems(problems, _FIELD_NAMES), elsewhere
    sections = {
        name: getattr(top, name)
        for name in Config.model_fields
        if name not in ("accounts", "accounts_dir")
    }
    config = Config(
        **sections,
        accounts=[s.account for s in accounts],
        accounts_dir=None if directory is None else str(directory),
    )
    return config, [], []


_INLINE = "the config's "


@dataclass(frozen=True)
class Sourced:
    """An account and where it was written: ``accounts[3]`` or an account file's path."""

    account: AccountConfig
    source: str


def read_accounts_dir(
    directory: Path, environ: Mapping[str, str], problems: list[Problem]
) -> tuple[list[Sourced], list[str]]:
    """The accounts of every ``*.yaml`` file in ``directory`` (names starting with a dot,
    such as a Kubernetes volume's ``..data``, skipped), in the order of the file names,
    and the files' problems, each line naming its file. A directory that cannot be
    listed is a problem of ``accounts_dir`` (appended to ``problems``)."""
    try:
        names = sorted(
            entry.name
            for entry in os.scandir(directory)
            if entry.name.endswith(".yaml") and not entry.name.startswith(".")
        )
    except FileNotFoundError:
        problems.append(Problem(("accounts_dir",), f"directory not found: {directory}"))
        return [], []
    except NotADirectoryError:
        problems.append(Problem(("accounts_dir",), f"not a directory: {directory}"))
        return [], []
    except OSError as exc:
        problems.append(
            Problem(("accounts_dir",), f"cannot list {directory}: {exc.strerror or 'I/O error'}")
        )
        return [], []
    accounts: list[Sourced] = []
    lines: list[str] = []
    for name in names:
        path = directory / name
        found, file_problems = _account_file(path, environ)
        accounts += [Sourced(account, str(path)) for account in found]
        lines += [f"{path}{'' if line.startswith(':') else ': '}{line}" for line in file_problems]
    return accounts, lines


def _account_file(path: Path, environ: Mapping[str, str]) -> tuple[list[AccountConfig], list[str]]:
    """One account file's accounts (a mapping: one account; a list: several), and its
    problems, each a line without the file's name (``:LINE:COL: ...`` for YAML errors)."""
    try:
        data = parse_yaml(read_small_file(path, MAX_CONFIG_BYTES), _FIELD_NAMES, fast=True)
    except SecretSourceError as exc:
        return [], [f"cannot read account file: {exc}"]
    except YamlError as exc:
        return [], [f":{exc}"]
    interpolated, problems, failed = interpolate(data, environ)
    checked: list[Problem] = []
    if isinstance(interpolated, dict):
        found = _accounts([interpolated], (), path.parent, checked, single=True)
    elif isinstance(interpolated, list) and interpolated:
        found = _accounts(interpolated, (), path.parent, checked)
        checked += _duplicates_in_list(interpolated)
    else:
        kind = "an empty document" if data is None else describe_input(data, sensitive=True)
        checked.append(Problem((), f"must be an account or a list of accounts (got {kind})"))
        found = []
    problems += [p for p in checked if not _under_any(p.loc, failed)]
    if problems:
        return [], format_problems(problems, _FIELD_NAMES)
    return [account for _, account in found], []


def _duplicates_in_list(raw_accounts: list[Any]) -> list[Problem]:
    first: dict[object, int] = {}
    problems = []
    for index, raw in enumerate(raw_accounts):
        name = raw.get("name") if isinstance(raw, dict) else None
        if not isinstance(name, str):
            continue
        known = first.setdefault(name, index)
        if known != index:
            message = f"duplicate account name {name!r} (also [{known}])"
            problems.append(Problem((index, "name"), message))
    return problems


def _duplicates(accounts: list[Sourced]) -> list[str]:
    """An account name given twice across the config and the account files, naming both
    places; a name given twice in one list is that list's own problem."""
    first: dict[str, Sourced] = {}
    lines = []
    for sourced in accounts:
        name = sourced.account.name
        known = first.setdefault(name, sourced)
        if known is sourced:
            continue
        both_inline = known.source.startswith(_INLINE) and sourced.source.startswith(_INLINE)
        if known.source != sourced.source and not both_inline:
            lines.append(
                f"{sourced.source}: duplicate account name {name!r} (also in {known.source})"
            )
    return lines


def _accounts(
    raw_accounts: list[Any],
    prefix: Loc,
    base_dir: Path,
    problems: list[Problem],
    *,
    single: bool = False,
) -> list[tuple[int, AccountConfig]]:
    """The valid accounts of a list, with their index; ``single``: the list holds one
    account given as a mapping, located at ``prefix`` itself."""
    accounts = []
    for index, raw in enumerate(raw_accounts):
        loc: Loc = prefix if single else (*prefix, index)
        given = _validate(AccountInput, raw, loc, problems)
        account = None if given is None else _resolve_account(given, loc, base_dir, problems)
        if account is not None:
            accounts.append((index, account))
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
        labels=given.labels,
        thresholds=given.thresholds,
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
