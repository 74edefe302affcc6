"""Configuration: embedded defaults, overridden by one TOML file, overridden by CLI flags.

Every key is documented in README.md ("Configuration"); keep the two in step.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Node:
    """A remote DICOM application entity (C-MOVE destination, commitment requester)."""

    name: str
    aet: str
    host: str
    port: int


@dataclass
class Config:
    data_dir: Path = Path("./data")
    aet: str = "PATHPACS"
    host: str = "0.0.0.0"
    dicom_port: int = 11112
    http_port: int = 8080
    on_conflict: str = "reject"  # same SOP Instance UID, different bytes: "reject" | "replace"
    max_associations: int = 32
    max_pdu: int = 0  # 0 = unlimited
    dimse_timeout: float = 120.0
    network_timeout: float = 120.0
    require_called_aet: bool = False
    http_workers: int = 1
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    lmdb_map_size_gb: int = 1024
    nodes: dict[str, Node] = field(default_factory=dict)

    def node_by_aet(self, aet: str) -> Node | None:
        for node in self.nodes.values():
            if node.aet == aet:
                return node
        return None


_ARCHIVE_KEYS = {f.name for f in fields(Config)} - {"nodes", "cors_origins"}


def load(path: Path | None) -> Config:
    """Read a TOML file into a Config; unknown keys are an error so typos don't pass silently."""
    cfg = Config()
    if path is None:
        return cfg
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}")
    return apply(cfg, raw, base_dir=Path(path).parent)


def apply(cfg: Config, raw: dict[str, Any], base_dir: Path = Path(".")) -> Config:
    for section in raw:
        if section not in {"archive", "http", "nodes"}:
            raise ConfigError(f"unknown config section [{section}]")
    for key, value in raw.get("archive", {}).items():
        if key not in _ARCHIVE_KEYS:
            raise ConfigError(f"unknown key archive.{key}")
        current = getattr(cfg, key)
        if isinstance(current, Path):
            value = Path(value)
            if not value.is_absolute():
                value = base_dir / value
        elif isinstance(current, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"archive.{key} must be true or false")
        elif isinstance(current, (int, float)) and not isinstance(value, (int, float)):
            raise ConfigError(f"archive.{key} must be a number")
        setattr(cfg, key, value)
    if cfg.on_conflict not in {"reject", "replace"}:
        raise ConfigError("archive.on_conflict must be \"reject\" or \"replace\"")
    http = raw.get("http", {})
    for key, value in http.items():
        if key == "cors_origins":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError("http.cors_origins must be a list of strings")
            cfg.cors_origins = value
        elif key == "workers":
            cfg.http_workers = int(value)
        else:
            raise ConfigError(f"unknown key http.{key}")
    for name, node in raw.get("nodes", {}).items():
        try:
            aet, host, port = node["aet"], node["host"], int(node["port"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"[nodes.{name}] needs aet, host and port")
        if not 0 < len(aet) <= 16:
            raise ConfigError(f"[nodes.{name}] aet must be 1-16 characters")
        cfg.nodes[name] = Node(name, aet, host, port)
    return cfg
