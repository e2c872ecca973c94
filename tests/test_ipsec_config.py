"""`kme ipsec config strongswan`, and the `kme ipsec config` command for every gateway."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kme.ipsec.config import AdapterSettings
from kme.ipsec.gateways import KMETarget
from kme.ipsec.swanctl import render_strongswan


def target(tmp_path: Path, peer: str | None = "SAE_B") -> KMETarget:
    return KMETarget(
        kme_id="KME_LAB",
        host="kme.example",
        port=8443,
        sae_id="SAE_A",
        peer_sae_id=peer,
        ca_file=tmp_path / "ca.pem",
        cert_file=tmp_path / "SAE_A.pem",
        key_file=tmp_path / "SAE_A.key",
        key_size_bits=256,
    )


@pytest.mark.parametrize("role", ["initiator", "responder"])
def test_strongswan_adapter_config_is_valid_as_printed(tmp_path: Path, role: str) -> None:
    """The printed adapter configuration is TOML that the adapter accepts as it stands, for
    this SAE against this KME, with PPKs required and the peer named."""
    text = render_strongswan(target(tmp_path), role)
    settings = AdapterSettings.model_validate(tomllib.loads(text))
    assert settings.role == role
    assert str(settings.kme.url) == "https://kme.example:8443/"
    assert settings.kme.certfile == tmp_path / "SAE_A.pem"
    assert settings.peer.sae_id == "SAE_B"
    assert (settings.peer.url is not None) == (role == "initiator")
    assert settings.connections[0].conn["version"] == "2"
    assert "ppk_required = yes" in text
    assert ("ppk_id = <key_ID" in text) == (role == "initiator")


def test_strongswan_config_marks_an_unknown_peer(tmp_path: Path) -> None:
    """Without --peer-sae the peer SAE is a marked placeholder, still valid TOML."""
    text = render_strongswan(target(tmp_path, peer=None))
    assert 'sae_id = "PEER_SAE_ID"   # CHANGE' in text
    AdapterSettings.model_validate(tomllib.loads(text))


def kme(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kme.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_ipsec_config_command_for_every_gateway(tmp_path: Path) -> None:
    """Issue 3 item 3: `kme ipsec config VENDOR --sae ID` prints each gateway's configuration
    for a real lab (its KME ID, address, certificate files), and refuses unknown SAEs in
    one sentence."""
    made = kme("init", "lab", "--fill", "1", "--sae", "SAE_A", "--sae", "SAE_B", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    config = str(tmp_path / "lab" / "kme.toml")
    expected = {
        "fortios": "config vpn qkd",
        "junos": "ppk-profile",
        "mikrotik": "/ip ipsec key qkd set",
        "strongswan": 'role = "initiator"',
    }
    for vendor, marker in expected.items():
        result = kme(
            "ipsec",
            "config",
            vendor,
            "--sae",
            "SAE_A",
            "--peer-sae",
            "SAE_B",
            "--host",
            "kme.example",
            "--config",
            config,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        assert marker in result.stdout
        assert "KME_LAB" in result.stdout
        assert str(tmp_path / "lab" / "certs" / "SAE_A.pem") in result.stdout
        assert "kme.example" in result.stdout
    unknown = kme("ipsec", "config", "junos", "--sae", "SAE_Z", "--config", config, cwd=tmp_path)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().count("\n") == 0
    assert "SAE_Z" in unknown.stderr
