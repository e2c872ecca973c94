"""`kme ipsec config strongswan`: the adapter configuration and the swanctl.conf view of
the connection it loads, for one gateway of this deployment."""

from __future__ import annotations

import json

from kme.ipsec.gateways import KMETarget


def _s(text: str) -> str:
    return json.dumps(text)  # TOML basic strings share JSON's escapes for what we write


def render_strongswan(target: KMETarget, role: str = "initiator") -> str:
    """Adapter TOML (valid as printed; CHANGE marks what depends on the sites), the
    equivalent swanctl.conf connection, and the commands to run it."""
    if role not in ("initiator", "responder"):
        raise ValueError("role must be initiator or responder")
    peer = target.peer_sae_id or "PEER_SAE_ID"
    initiator = role == "initiator"
    lines = [
        f"# strongSwan gateway of SAE {target.sae_id!r} on KME {target.kme_id!r} ({target.url}),",
        f"# as the {role}. strongSwan has no ETSI 014 client: run the kme PPK adapter beside",
        "# charon. It fetches keys from the KME, agrees key_IDs with the peer gateway's",
        "# adapter over mutual TLS, and loads them into charon over VICI as RFC 8784 PPKs.",
        "#",
        "# 1. Files for the adapter (copy them to the gateway, e.g. /etc/kme/):",
        f"#      {target.ca_file}   the CA of the KME (and of the peer adapter)",
        f"#      {target.cert_file}   this gateway's SAE certificate",
        f"#      {target.key_file}   its private key (mode 0600)",
        "#    Packages: strongswan-charon strongswan-swanctl (Debian), and `pip install kme`.",
        "#",
        "# 2. /etc/kme/adapter.toml (lines marked CHANGE depend on your sites):",
        "",
        f"role = {_s(role)}",
        f"name = {_s('gateway-' + target.sae_id)}",
        "",
        "[kme]",
        f"url = {_s(target.url)}",
        f"ca_file = {_s(str(target.ca_file))}",
        f"certfile = {_s(str(target.cert_file))}",
        f"keyfile = {_s(str(target.key_file))}",
        f"key_size = {target.key_size_bits}",
        "",
        "[peer]",
        f"sae_id = {_s(peer)}"
        + ("" if target.peer_sae_id else "   # CHANGE: the peer gateway's SAE ID"),
        f"identity = {_s(peer)}   # CN of the peer adapter's certificate",
        f"ca_file = {_s(str(target.ca_file))}",
    ]
    if initiator:
        lines.append('url = "https://peer-gateway.example:9443"   # CHANGE: the peer adapter')
    else:
        lines += [
            "",
            "[listen]",
            'host = "0.0.0.0"   # CHANGE: where the peer adapter connects',
            "port = 9443",
        ]
    lines += [
        "",
        "[charon]",
        'vici = "/var/run/charon.vici"',
        'mode = "vici"   # or "file": secrets_file + swanctl_conf, see docs/ipsec.md',
        "",
        "[[connections]]",
        'name = "qkd"',
        'psk = "CHANGE-the-classical-IKE-pre-shared-key"',
        'psk_owners = ["site-a.example", "site-b.example"]   # CHANGE: both IKE identities',
        "rotate_seconds = 3600",
        "",
        "[connections.conn]",
        'version = "2"',
        'local_addrs = ["192.0.2.1"]    # CHANGE: this gateway',
        'remote_addrs = ["198.51.100.1"]   # CHANGE: the peer gateway',
        'proposals = ["aes256-sha256-x25519"]',
        'childless = "allow"',
        "",
        "[connections.conn.local]",
        'auth = "psk"',
        f"id = {_s('site-a.example' if initiator else 'site-b.example')}   # CHANGE",
        "",
        "[connections.conn.remote]",
        'auth = "psk"',
        f"id = {_s('site-b.example' if initiator else 'site-a.example')}   # CHANGE",
        "",
        "# 3. What the adapter loads into charon over VICI, as swanctl.conf would say it",
        "#    (for reading and diffing; do not also load it with swanctl):",
        "#",
        "# connections {",
        "#     qkd {",
        "#         version = 2",
        "#         local_addrs = 192.0.2.1",
        "#         remote_addrs = 198.51.100.1",
        "#         proposals = aes256-sha256-x25519",
        "#         childless = allow",
        "#         ppk_required = yes",
    ]
    if initiator:
        lines.append(
            "#         ppk_id = <key_ID of the current KME key, replaced at every rotation>"
        )
    else:
        lines.append("#         # no ppk_id: the responder accepts any PPK it holds")
    lines += [
        "#         local { auth = psk; id = "
        + ("site-a.example" if initiator else "site-b.example")
        + " }",
        "#         remote { auth = psk; id = "
        + ("site-b.example" if initiator else "site-a.example")
        + " }",
        "#         # children { ... } as your tunnels need",
        "#     }",
        "# }",
        "# secrets: the IKE PSK (VICI id kme-ike-psk-qkd) and one PPK per key_ID (VICI id",
        "# kme-ppk-<key_ID>); in file mode both are written to secrets_file (mode 0600, sections",
        "# ike-kme-qkd and ppk-<key_ID>) and loaded with swanctl --load-creds.",
        "#",
        "# 4. Run it (systemd unit or supervisor of your choice):",
        "#      kme ipsec strongswan --config /etc/kme/adapter.toml",
    ]
    return "\n".join(lines) + "\n"
