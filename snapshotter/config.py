"""The configuration file: lookup order, ``${VAR}`` expansion and validation.

Lookup: ``--config PATH``, else ``$SNAPSHOTTER_CONFIG``, else ``./snapshotter.toml``.
Every mistake is one line naming the file and the key, exit code 2.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from .backend import SourceBackend, load_backend, validate_options
from .errors import ConfigError
from .names import NAME_RE

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

REPOSITORY_KEYS = {"url", "endpoint_url", "region", "compression_level", "hash", "timeout"}


@dataclass
class SourceConfig:
    name: str
    backend: str
    options: dict[str, Any]
    backend_cls: type[SourceBackend]

    def open(self, base_dir: str) -> SourceBackend:
        inst = self.backend_cls(self.name, self.options)
        inst.base_dir = base_dir
        return inst


@dataclass
class Config:
    path: str | None  # None when no file was found (repository from --repo only)
    repository_url: str | None = None
    endpoint_url: str | None = None
    region: str | None = None
    compression_level: int = 3
    #: S3: seconds for each connect and each read of a request's answer (None: the default)
    repository_timeout: float | None = None
    #: content hash of a repository `init` creates (an existing one keeps its own)
    hash: str = "blake3"
    hash_set: bool = False
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    #: ``restore --create-missing``: sources open with ``create_missing`` set (a SQLite
    #: database file that is gone is created by the restore's writer)
    create_missing: bool = False

    @property
    def base_dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.path)) if self.path else os.getcwd()

    def source(self, name: str) -> SourceConfig:
        from .errors import NotFound
        if name not in self.sources:
            known = ", ".join(sorted(self.sources)) or "none configured"
            raise NotFound(f"unknown source {name!r} (configured: {known})")
        return self.sources[name]

    def open_source(self, name: str) -> SourceBackend:
        inst = self.source(name).open(self.base_dir)
        if self.create_missing:
            inst.create_missing = True
        return inst


def _expand(value: Any, where: str, path: str) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            var = m.group(1)
            if var not in os.environ:
                raise ConfigError(f"{path}: {where}: environment variable {var} is not set")
            return os.environ[var]
        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [_expand(v, where, path) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}", path) for k, v in value.items()}
    return value


def find_config_path(explicit: str | None) -> tuple[str | None, bool]:
    """The config file to read and whether the user named it (then it must exist)."""
    if explicit:
        return explicit, True
    env = os.environ.get("SNAPSHOTTER_CONFIG")
    if env:
        return env, True
    if os.path.exists("snapshotter.toml"):
        return "snapshotter.toml", False
    return None, False


def load_config(explicit: str | None = None) -> Config:
    path, required = find_config_path(explicit)
    if path is None:
        return Config(path=None)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: config file not found") from None
        return Config(path=None)
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(raw, path)


def parse_config(raw: dict[str, Any], path: str) -> Config:
    cfg = Config(path=path)
    for top in raw:
        if top not in ("repository", "sources"):
            raise ConfigError(f"{path}: unknown section [{top}] (known: [repository], [sources.NAME])")
    repo = raw.get("repository", {})
    if not isinstance(repo, dict):
        raise ConfigError(f"{path}: repository: expected a table [repository]")
    for key in repo:
        if key not in REPOSITORY_KEYS:
            raise ConfigError(f"{path}: repository.{key}: unknown key (known: {', '.join(sorted(REPOSITORY_KEYS))})")
    repo = _expand(repo, "repository", path)
    for key in ("url", "endpoint_url", "region"):
        if key in repo and not isinstance(repo[key], str):
            raise ConfigError(f"{path}: repository.{key}: expected a string")
    cfg.repository_url = repo.get("url")
    cfg.endpoint_url = repo.get("endpoint_url")
    cfg.region = repo.get("region")
    level = repo.get("compression_level", 3)
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 22:
        raise ConfigError(f"{path}: repository.compression_level: expected an integer from 1 to 22")
    cfg.compression_level = level
    if "timeout" in repo:
        from .timeouts import check_seconds
        problem = check_seconds(repo["timeout"])
        if problem:
            raise ConfigError(f"{path}: repository.timeout: {problem} (got {repo['timeout']!r})")
        cfg.repository_timeout = float(repo["timeout"])
    from .hashing import ALGORITHMS
    if "hash" in repo:
        if repo["hash"] not in ALGORITHMS:
            raise ConfigError(f"{path}: repository.hash: expected one of {', '.join(ALGORITHMS)}")
        cfg.hash, cfg.hash_set = repo["hash"], True

    sources = raw.get("sources", {})
    if not isinstance(sources, dict):
        raise ConfigError(f"{path}: sources: expected tables [sources.NAME]")
    for name, table in sources.items():
        where = f"sources.{name}"
        if not NAME_RE.match(name):
            raise ConfigError(f"{path}: {where}: invalid source name (use A-Z a-z 0-9 . _ -, starting with a letter or digit)")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {where}: expected a table [sources.{name}]")
        backend = table.get("backend")
        if not backend:
            raise ConfigError(f"{path}: {where}.backend: missing (run `snapshotter backends` for the installed ones)")
        if not isinstance(backend, str):
            raise ConfigError(f"{path}: {where}.backend: expected a string")
        cls = load_backend(backend, where=f"{path}: {where}.backend: ")
        options = validate_options(cls, _expand(table, where, path), f"{path}: {where}")
        cfg.sources[name] = SourceConfig(name, backend, options, cls)
    return cfg
