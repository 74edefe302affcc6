"""Configuration: embedded defaults, overridden by one TOML file, overridden by CLI flags.

The TOML file is validated against a schema (pydantic models below: types are strict, every
number has a range, unknown keys are errors), and so is the final `Config` after the CLI
flags are applied, so a bad value anywhere is one line and exit 2, never a traceback or a
silently accepted `dicom_port = true`. Every key is documented in README.md
("Configuration"); keep the two in step.
"""
from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, ValidationError

MAX_PORT = 65535


class ConfigError(ValueError):
    pass


# -- value rules shared by the file schema and the CLI flags ---------------------------------

_AE_CHARS = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE: no backslash, no control chars
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*\.?$")


def check_aet(value: str) -> str:
    """An AE title (PS3.5 AE VR): 1-16 characters, no backslash or control characters, not blank."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if not _AE_CHARS.match(value) or not value.strip():
        raise ValueError(f"{value[:40]!r} is not an AE title (1-16 characters, no backslash or control characters)")
    return value.strip()


def check_host(value: str) -> str:
    """An IP address or a host name to listen on or connect to."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not _HOSTNAME.match(value):
        raise ValueError(f"{value[:60]!r} is not an IP address or host name")
    return value


def check_network(value: str) -> str:
    """An IP address or network (CIDR) a request may come from."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value[:60]!r} is not an IP address or network")
    return value


def _seconds(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("must be a number of seconds")
    return float(v)


Port = Annotated[StrictInt, Field(ge=1, le=MAX_PORT)]
Seconds = Annotated[float, BeforeValidator(_seconds), Field(gt=0, le=86400)]
AeTitle = Annotated[str, AfterValidator(check_aet)]
Host = Annotated[str, AfterValidator(check_host)]
Network = Annotated[str, AfterValidator(check_network)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ArchiveSection(_Section):
    data_dir: str = Field("./data", min_length=1, max_length=4096)
    aet: AeTitle = "PATHPACS"
    host: Host = "0.0.0.0"
    dicom_port: Port = 11112
    http_port: Port = 8080
    on_conflict: Literal["reject", "replace"] = "reject"
    lmdb_map_size_gb: Annotated[StrictInt, Field(ge=1, le=1 << 20)] = 1024
    # DIMSE keys that lived here before [dimse] existed; still read, [dimse] wins.
    max_associations: Annotated[StrictInt, Field(ge=1, le=1000)] | None = None
    max_pdu: Annotated[StrictInt, Field(ge=4096, le=1 << 26)] | None = None
    dimse_timeout: Seconds | None = None
    network_timeout: Seconds | None = None
    require_called_aet: StrictBool | None = None


class DimseSection(_Section):
    max_associations: Annotated[StrictInt, Field(ge=1, le=1000)] = 32
    max_pending: Annotated[StrictInt, Field(ge=1, le=10000)] = 256
    max_pdu: Annotated[StrictInt, Field(ge=4096, le=1 << 26)] = 4 << 20
    acse_timeout: Seconds = 10.0
    dimse_timeout: Seconds = 120.0
    network_timeout: Seconds = 120.0
    require_called_aet: StrictBool = False


class HttpSection(_Section):
    workers: Annotated[StrictInt, Field(ge=1, le=64)] = 1
    cors_origins: list[Annotated[str, Field(min_length=1, max_length=512)]] = ["*"]
    trusted_proxies: list[Network] = []
    max_stow_mb: Annotated[StrictInt, Field(ge=1, le=1 << 20)] = 16384
    max_stow_parts: Annotated[StrictInt, Field(ge=1, le=100000)] = 10000
    max_results: Annotated[StrictInt, Field(ge=1, le=1000000)] = 10000
    read_timeout: Seconds = 60.0
    keepalive_timeout: Seconds = 75.0
    access_log: StrictBool = True


class NodeSection(_Section):
    aet: AeTitle
    host: Host
    port: Port


class ConfigFile(_Section):
    archive: ArchiveSection = ArchiveSection()
    dimse: DimseSection = DimseSection()
    http: HttpSection = HttpSection()
    nodes: dict[Annotated[str, Field(min_length=1, max_length=64)], NodeSection] = {}


# -- the runtime configuration (flat: what the code reads) ----------------------------------

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
    lmdb_map_size_gb: int = 1024
    # [dimse]
    max_associations: int = 32
    max_pending: int = 256  # connections still negotiating (they hold no association slot)
    max_pdu: int = 4 << 20
    acse_timeout: float = 10.0
    dimse_timeout: float = 120.0
    network_timeout: float = 120.0
    require_called_aet: bool = False
    # [http]
    http_workers: int = 1
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    trusted_proxies: list[str] = field(default_factory=list)
    max_stow_mb: int = 16384
    max_stow_parts: int = 10000
    max_results: int = 10000
    read_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    access_log: bool = True
    nodes: dict[str, Node] = field(default_factory=dict)

    def node_by_aet(self, aet: str) -> Node | None:
        for node in self.nodes.values():
            if node.aet == aet:
                return node
        return None


_FLAT_NAMES = {f.name for f in fields(Config)}
_HTTP_RENAMES = {"workers": "http_workers"}


def _one_line(exc: ValidationError) -> str:
    """The first schema error as `section.key: what is wrong` (pydantic prints paragraphs)."""
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"unknown key {where}" if "." in where else f"unknown config section [{where}]"
    shown = err["type"] not in ("missing", "value_error") and not isinstance(err.get("input"), dict)
    extra = f" (got {err['input']!r})" if shown else ""
    return f"{where}: {msg}{extra[:120]}"


def parse(raw: dict[str, Any]) -> ConfigFile:
    try:
        return ConfigFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


def load(path: Path | None) -> Config:
    """Read and validate a TOML file into a Config; any problem is one ConfigError line."""
    cfg = Config()
    if path is None:
        return cfg
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}")
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}")
    return apply(cfg, raw, base_dir=Path(path).parent)


def apply(cfg: Config, raw: dict[str, Any], base_dir: Path = Path(".")) -> Config:
    """Validate `raw` (the TOML document) and copy its values onto `cfg`."""
    doc = parse(raw)
    given = raw.get("archive", {}) if isinstance(raw.get("archive"), dict) else {}
    for key in doc.archive.model_fields_set:
        value = getattr(doc.archive, key)
        if key == "data_dir":
            p = Path(value)
            value = p if p.is_absolute() else base_dir / p
        if value is not None and key in given:
            setattr(cfg, key, value)
    for key in doc.dimse.model_fields_set:
        setattr(cfg, key, getattr(doc.dimse, key))
    for key in doc.http.model_fields_set:
        setattr(cfg, _HTTP_RENAMES.get(key, key), getattr(doc.http, key))
    for name, node in doc.nodes.items():
        cfg.nodes[name] = Node(name, node.aet, node.host, node.port)
    return validate(cfg)


def validate(cfg: Config) -> Config:
    """Check the final values (file + flags) against the same schema; ConfigError if one is off."""
    flat = {
        "archive": {"data_dir": str(cfg.data_dir), "aet": cfg.aet, "host": cfg.host,
                    "dicom_port": cfg.dicom_port, "http_port": cfg.http_port,
                    "on_conflict": cfg.on_conflict, "lmdb_map_size_gb": cfg.lmdb_map_size_gb},
        "dimse": {k: getattr(cfg, k) for k in DimseSection.model_fields},
        "http": {**{k: getattr(cfg, _HTTP_RENAMES.get(k, k)) for k in HttpSection.model_fields}},
    }
    doc = parse(flat)
    cfg.aet = doc.archive.aet
    return cfg
