"""Settings: a TOML file with ``KME_`` environment overrides. Nothing is built at import time.

``load_settings(path)`` reads a deployment's ``kme.toml``; tests build :class:`Settings`
directly. Relative paths in the file (certificates, the SQLite database) are taken
relative to the file's folder, so a lab directory can be moved as a whole.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from kme.errors import ConfigError

Port = Annotated[int, Field(ge=0, le=65535)]  # 0: any free port (tests)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: Port = 8443
    certfile: Path = Path("certs/kme.pem")
    keyfile: Path = Path("certs/kme.key")
    ca_file: Path = Path("certs/ca.pem")
    # Trusted-proxy mode (off while empty): a request that arrives from one of these
    # addresses over a connection whose client certificate is one of the pinned proxy
    # certificates (SHA-256) must name the SAE's certificate in `proxy_cert_header`
    # (URL-encoded PEM, as nginx's $ssl_client_escaped_cert). Any other connection is
    # identified by its own certificate and the header is ignored.
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    trusted_proxy_certs: list[str] = []
    proxy_cert_header: str = "x-ssl-client-cert"
    access_log: bool = True

    @field_validator("proxy_cert_header")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()

    @field_validator("trusted_proxy_certs")
    @classmethod
    def _fingerprints(cls, values: list[str]) -> list[str]:
        from kme.saes import normalise_fingerprint

        return [normalise_fingerprint(value) for value in values]

    @model_validator(mode="after")
    def _proxy_pinned(self) -> ServerSettings:
        # An address alone proves nothing: any SAE behind the proxy's address could paste
        # another SAE's (public) certificate into the header.
        if bool(self.trusted_proxies) != bool(self.trusted_proxy_certs):
            raise ValueError(
                "trusted_proxies and trusted_proxy_certs go together: trusted-proxy mode "
                "needs the proxies' addresses and their pinned certificates"
            )
        return self


class IdentitySettings(_Section):
    """How a verified client certificate maps to an SAE ID (checklist item 3)."""

    source: Literal["cn", "san", "fingerprint"] = "cn"
    san_type: Literal["dns", "uri", "email"] = "uri"
    # With source = "san": only SAN entries starting with this prefix count, and the
    # prefix is removed to give the SAE ID (for example "urn:qkd:sae:").
    san_prefix: str = ""


class KeySettings(_Section):
    key_size: int = 256
    min_key_size: int = 64
    max_key_size: int = 8192
    max_key_per_request: int = Field(default=128, ge=1)
    max_key_count: int = Field(default=100_000, ge=1)
    max_sae_id_count: int = Field(default=8, ge=0)
    # 503 is our reading of the spec ("error on server side"); some integrators want 400.
    insufficient_keys_status: Literal[400, 503] = 503
    strict_optional_extensions: bool = False
    # Seconds an enc_keys delivery waits for its slaves before its material is destroyed.
    undelivered_key_ttl: float = Field(default=86_400.0, gt=0)

    @field_validator("key_size", "min_key_size", "max_key_size")
    @classmethod
    def _whole_bytes(cls, value: int) -> int:
        if value <= 0 or value % 8:
            raise ValueError(f"must be a positive multiple of 8 bits, not {value}")
        return value

    @model_validator(mode="after")
    def _invariants(self) -> KeySettings:
        if not self.min_key_size <= self.key_size <= self.max_key_size:
            raise ValueError("min_key_size <= key_size <= max_key_size must hold")
        return self


class LinkSettings(_Section):
    """The emulated QKD link that fills the pool."""

    rate_bps: int = Field(default=256_000, ge=0)  # 0 stops the emulated link
    tick_seconds: float = Field(default=0.5, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KME_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    kme_id: str = "KME_LAB"
    database_url: str = "sqlite+aiosqlite:///kme.db"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    server: ServerSettings = ServerSettings()
    identity: IdentitySettings = IdentitySettings()
    keys: KeySettings = KeySettings()
    link: LinkSettings = LinkSettings()

    @field_validator("kme_id")
    @classmethod
    def _id_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    def relative_to(self, base: Path) -> Settings:
        """The same settings with relative file paths and SQLite URLs anchored at `base`."""

        def anchor(path: Path) -> Path:
            return path if path.is_absolute() else (base / path)

        server = self.server.model_copy(
            update={
                "certfile": anchor(self.server.certfile),
                "keyfile": anchor(self.server.keyfile),
                "ca_file": anchor(self.server.ca_file),
            }
        )
        return self.model_copy(
            update={"server": server, "database_url": anchor_sqlite_url(self.database_url, base)}
        )


def anchor_sqlite_url(url: str, base: Path) -> str:
    """Make a relative SQLite file URL absolute under `base`; other URLs pass unchanged."""
    for prefix in ("sqlite+aiosqlite:///", "sqlite:///"):
        if url.startswith(prefix):
            rest = url[len(prefix) :]
            if rest and not rest.startswith("/") and not rest.startswith(":memory:"):
                return f"sqlite+aiosqlite:///{(base / rest).resolve()}"
            return "sqlite+aiosqlite:///" + rest
    return url


def load_settings(path: Path) -> Settings:
    """Read `path` (TOML) with environment overrides, or raise ConfigError in one sentence."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such configuration file (create one with `kme init`)")

    class FromFile(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, path))

    try:
        loaded = FromFile()
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(path, exc)) from None
    except ValueError as exc:  # TOML syntax
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return Settings.model_validate(loaded.model_dump()).relative_to(path.parent.resolve())


def describe_validation_error(path: Path, exc: ValidationError) -> str:
    """One sentence: where the bad value came from (the file, or the environment variable
    that overrides it), the field, and what is wrong."""
    first: dict[str, Any] = dict(exc.errors()[0])
    parts = [str(part) for part in first["loc"]]
    field = ".".join(parts) or "(top level)"
    message = str(first["msg"]).removeprefix("Value error, ")
    more = len(exc.errors()) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    variable = _environment_variable(parts)
    source = f"environment variable {variable} (overriding {path})" if variable else str(path)
    return f"{source}: field '{field}': {message}{tail}"


def _environment_variable(parts: list[str]) -> str | None:
    """The KME_ variable that set this field (or its section), if one is set."""
    set_names = {name.upper(): name for name in os.environ}
    for depth in range(len(parts), 0, -1):
        candidate = "KME_" + "__".join(parts[:depth]).upper()
        if candidate in set_names:
            return set_names[candidate]
    return None
