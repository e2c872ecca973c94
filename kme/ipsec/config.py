"""Configuration of the strongSwan PPK adapter (`kme ipsec strongswan --config FILE`).

One adapter runs beside each gateway's charon. It speaks to its own KME only through the
ETSI GS QKD 014 API, to the peer gateway's adapter over mutual TLS, and to charon over
VICI (or, in file mode, through a swanctl.conf include).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, SecretStr, ValidationError

from kme.config import describe_validation_error
from kme.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KMEClientSettings(_Section):
    """This site's KME, reached as this gateway's SAE."""

    url: HttpUrl  # e.g. https://kme-a.example:8443 (the API lives under /api/v1/keys)
    ca_file: Path
    certfile: Path
    keyfile: Path
    key_size: int = Field(default=256, ge=64, multiple_of=8)  # PPK size in bits
    timeout: float = Field(default=10.0, gt=0)


class PeerSettings(_Section):
    """The other gateway: its SAE and its adapter."""

    sae_id: str  # the peer gateway's SAE ID (slave of our enc_keys / master of our dec_keys)
    url: HttpUrl | None = None  # initiator: the peer adapter's address
    identity: str  # CN of the peer adapter's certificate; nothing else may talk to us
    ca_file: Path  # CA that signed the peer adapter's certificate
    timeout: float = Field(default=15.0, gt=0)


class ListenSettings(_Section):
    """Responder: where the peer adapter delivers key_IDs (mutual TLS)."""

    host: str = "127.0.0.1"
    port: int = Field(default=9443, ge=0, le=65535)
    certfile: Path | None = None  # default: the KME client certificate
    keyfile: Path | None = None


class CharonSettings(_Section):
    vici: Path = Path("/var/run/charon.vici")
    # vici: PPKs are loaded over VICI and never touch a disk. file: PPKs are written to
    # `secrets_file` (mode 0600, a swanctl.conf include) and `swanctl --load-creds` runs.
    mode: Literal["vici", "file"] = "vici"
    secrets_file: Path | None = None
    swanctl_conf: Path | None = None  # the swanctl.conf that includes secrets_file
    swanctl: str = "swanctl"


class ConnectionSettings(_Section):
    """One IKE connection protected by KME keys."""

    name: str
    # The connection as VICI's load-conn takes it (the swanctl.conf `connections.<name>`
    # section): local_addrs, remote_addrs, proposals, local, remote, children, ...
    # The adapter adds ppk_id (initiator) and ppk_required = yes.
    conn: dict[str, Any]
    # The classical IKE credential (RFC 8784 mixes the PPK into it): a PSK and its owners.
    psk: SecretStr | None = None
    psk_owners: list[str] = []
    rotate_seconds: float = Field(default=3600.0, gt=0)
    initiate_timeout_ms: int = Field(default=10_000, ge=100)


class FaultSettings(_Section):
    """Fault injection for integration tests; every switch is off by default."""

    # Responder: load a PPK that differs from the KME's key (proves a mismatch fails).
    corrupt_ppk: bool = False


class AdapterSettings(_Section):
    role: Literal["initiator", "responder"]
    name: str = "kme-adapter"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    kme: KMEClientSettings
    peer: PeerSettings
    listen: ListenSettings = ListenSettings()
    charon: CharonSettings = CharonSettings()
    connections: list[ConnectionSettings] = Field(min_length=1)
    retry_initial: float = Field(default=0.5, gt=0)
    retry_max: float = Field(default=30.0, gt=0)
    check_seconds: float = Field(default=2.0, gt=0)
    faults: FaultSettings = FaultSettings()

    def anchored(self, base: Path) -> AdapterSettings:
        """Relative file paths taken relative to `base` (the config file's folder)."""

        def fix(value: Any) -> Any:
            if isinstance(value, Path) and not value.is_absolute():
                return base / value
            if isinstance(value, BaseModel):
                return value.model_copy(
                    update={name: fix(getattr(value, name)) for name in type(value).model_fields}
                )
            return value

        fixed: AdapterSettings = fix(self)
        return fixed


def load_adapter_settings(path: Path) -> AdapterSettings:
    import tomllib

    if not path.is_file():
        raise ConfigError(f"{path}: no such adapter configuration file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        settings = AdapterSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(path, exc)) from None
    if settings.role == "initiator" and settings.peer.url is None:
        raise ConfigError(f"{path}: field 'peer.url': an initiator must name the peer adapter")
    if settings.charon.mode == "file" and (
        settings.charon.secrets_file is None or settings.charon.swanctl_conf is None
    ):
        raise ConfigError(
            f"{path}: fields 'charon.secrets_file'/'charon.swanctl_conf': file mode needs both"
        )
    return settings.anchored(path.parent.resolve())
