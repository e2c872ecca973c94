"""Ready-to-paste KME client configurations for IPsec gateways with a built-in ETSI 014 client.

``render(vendor, target)`` prints, for one gateway (one SAE) of this kme deployment: a comment
header, the certificate files and the commands that import them, the KME client settings,
and the IKE part that makes the tunnel use the KME's keys. Parts that depend on the user's
existing VPN are ``<placeholders>``. Every keyword below comes from the vendor documentation
named in the rendered header; the ones no fetched page confirmed are marked UNCONFIRMED.

FortiOS 7.4.2+ (Fortinet CLI Reference "config vpn qkd", 7.4.2; "config vpn ipsec
phase1-interface", 7.4.4 and 8.0.0; "config user peer"; "config vpn certificate ca|local";
Administration Guide "IPsec key retrieval with a QKD system using the ETSI standardized API"):
  config vpn qkd / edit / set server, port, id, peer, certificate, comment.
  phase1-interface: set qkd {disable|allow|require}, set qkd-profile <name>; set qkd-hybrid
  {disable|allow|require} is in the 8.0.0 reference but not in 7.4.4's, so it is only shown
  as a comment. Fortinet does not call this RFC 8784; it mixes KME keys into the IKE SA.
  ``peer`` names a ``config user peer`` entry (set ca, set cn) that checks the KME certificate.
  UNCONFIRMED: whether ``set private-key`` accepts an unencrypted key (the reference says
  "PEM format key, encrypted with a password"; ``set password`` is its passphrase).

Junos (SRX, Junos Key Manager; Juniper "Quantum Safe IPsec VPN"):
  set security ike gateway <GW> ppk-profile <P>; request security pki ca-certificate load
  ca-profile <CA> filename <F>; request security pki local-certificate load certificate-id
  <ID> filename <F> key <K>; set security pki ca-profile <CA> ca-identity <CA>.
  UNCONFIRMED (no fetched page showed them; they follow the brief and Juniper's statement
  names as we recall them): the quantum-key-manager leaves url, local-sae-id,
  local-certificate-id, trusted-cas, peer-sae-ids; and whether url takes the bare
  https://host:port.

MikroTik RouterOS 7 (help.mikrotik.com "QKD Integration in RouterOS IPsec (PPK)"):
  /ip ipsec key qkd set address=IP:port certificate= key-size=<bytes> kme-id= peer-sae-id=
  (a single settings item: the documentation uses ``set``, not ``add``); /ip ipsec profile
  ... ppk=qkd; /certificate import file-name= passphrase=. An imported certificate is named
  after its file with "_0" appended (MikroTik manual, IKEv2 EAP with NordVPN: root.der_0).
  UNCONFIRMED: a DNS name or IPv6 literal in ``address`` (the documentation shows IPv4:port).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

VENDORS: tuple[str, ...] = ("fortios", "junos", "mikrotik")

FORTIOS_DOCS = (
    "https://docs.fortinet.com/document/fortigate/7.4.2/cli-reference/320620",
    "https://docs.fortinet.com/document/fortigate/7.6.6/administration-guide/775314",
)
JUNOS_DOCS = (
    "https://www.juniper.net/documentation/us/en/software/junos/vpn-ipsec/topics/topic-map/"
    "quantum-safe-ipsec-vpn.html",
)
MIKROTIK_DOCS = ("https://help.mikrotik.com/docs/spaces/ROS/pages/341770268/QKD",)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class KMETarget:
    """One gateway (SAE) of this kme deployment, as its configuration needs it."""

    kme_id: str  # this KME's ID (its server certificate's CN)
    host: str  # host name or IP the gateway dials (in the server certificate's SANs)
    port: int  # HTTPS port (default deployments: 8443)
    sae_id: str  # the gateway's own SAE ID (its client certificate's CN)
    peer_sae_id: str | None  # the remote gateway's SAE ID when known, else None
    ca_file: Path  # PEM of the CA that signed the KME's server certificate
    cert_file: Path  # PEM client certificate of the gateway's SAE
    key_file: Path  # PEM private key of that certificate
    key_size_bits: int  # the KME's default key size in bits

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is not in 1..65535")
        if self.key_size_bits <= 0 or self.key_size_bits % 8:
            raise ValueError(f"key size {self.key_size_bits} is not a positive multiple of 8")
        texts = [
            self.kme_id,
            self.host,
            self.sae_id,
            *([self.peer_sae_id] if self.peer_sae_id is not None else []),
        ]
        for text in [*texts, str(self.ca_file), str(self.cert_file), str(self.key_file)]:
            if not text or _CONTROL.search(text):
                raise ValueError(f"{text!r} is empty or holds a control character")
        if any(c.isspace() or c in "[]/" for c in self.host):
            raise ValueError(f"host {self.host!r} is not a host name or IP address")

    @property
    def url(self) -> str:
        return f"https://{_hostport(self.host, self.port)}"


def render(vendor: str, target: KMETarget) -> str:
    """The configuration for ``vendor`` (one of VENDORS) against ``target``."""
    renderers: dict[str, Callable[[KMETarget], list[str]]] = {
        "fortios": _fortios,
        "junos": _junos,
        "mikrotik": _mikrotik,
    }
    if vendor not in renderers:
        raise ValueError(f"unknown vendor {vendor!r}; choose one of {', '.join(VENDORS)}")
    return "\n".join(renderers[vendor](target)) + "\n"


# -- helpers -------------------------------------------------------------------------------


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _name(prefix: str, text: str, limit: int) -> str:
    """An object name from ``text``: letters, digits, '_' and '-' only, at most ``limit``."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "id"
    return f"{prefix}{slug}"[:limit].rstrip("-")


def _quote(text: str, specials: str = '\\"') -> str:
    """A double-quoted string; each character of ``specials`` gets a backslash."""
    return '"' + "".join("\\" + c if c in specials else c for c in text) + '"'


def _ros(text: str) -> str:
    # RouterOS Manual:Scripting: \" \\ \$ (variables) and \? (console help) in strings.
    return _quote(text, '\\"$?')


def _peer(target: KMETarget) -> str:
    return target.peer_sae_id if target.peer_sae_id is not None else "<peer-sae-id>"


def _header(title: str, target: KMETarget, docs: tuple[str, ...]) -> list[str]:
    peer = _peer(target)
    lines = [
        f"# {title}",
        f"# KME {target.kme_id!r} at {target.url}; this gateway is SAE {target.sae_id!r},",
        f"# the remote gateway is SAE {peer!r}; KME key size {target.key_size_bits} bits.",
    ]
    if target.peer_sae_id is None:
        lines.append("# REPLACE <peer-sae-id> with the remote gateway's SAE ID before pasting.")
    lines.append("# Replace every other <placeholder> with a name from your existing VPN.")
    lines += [f"# Syntax: {url}" for url in docs]
    return [*lines, "#"]


def _files(target: KMETarget) -> list[str]:
    return [
        "# Certificate files on this host:",
        f"#   CA of the KME server certificate: {target.ca_file}",
        f"#   client certificate of SAE {target.sae_id!r}: {target.cert_file}",
        f"#   its private key (keep it secret): {target.key_file}",
    ]


def _scp(files: list[tuple[Path, str]], destination: str) -> list[str]:
    return [f"#   scp {shlex.quote(str(path))} {destination}{remote}" for path, remote in files]


# -- FortiOS -------------------------------------------------------------------------------


def _fortios(t: KMETarget) -> list[str]:
    ca, cert = _name("kme-ca-", t.kme_id, 35), _name("kme-sae-", t.sae_id, 35)
    peer, qkd = _name("kme-peer-", t.kme_id, 35), _name("kme-", t.sae_id, 35)
    q = _quote
    return [
        *_header("FortiOS 7.4.2+: ETSI GS QKD 014 client (config vpn qkd)", t, FORTIOS_DOCS),
        *_files(t),
        "# 1. Import them: paste each file's text (e.g. the output of cat FILE) between the",
        "#    quotes, replacing <contents of FILE>; the CLI takes a multi-line quoted value.",
        "#    If the key file is encrypted, add  set password <its passphrase>  before",
        "#    set private-key. (GUI: System > Certificates > Create/Import.)",
        "config vpn certificate ca",
        f"    edit {q(ca)}",
        f"        set ca {q(f'<contents of {t.ca_file}>')}",
        "    next",
        "end",
        "config vpn certificate local",
        f"    edit {q(cert)}",
        f"        set private-key {q(f'<contents of {t.key_file}>')}",
        f"        set certificate {q(f'<contents of {t.cert_file}>')}",
        "    next",
        "end",
        "# 2. Check the KME's certificate: signed by that CA, with the KME ID as its CN.",
        "config user peer",
        f"    edit {q(peer)}",
        f"        set ca {q(ca)}",
        f"        set cn {q(t.kme_id)}",
        "    next",
        "end",
        f"# 3. The KME client. FortiOS has no peer SAE setting; register SAE {_peer(t)!r}",
        "#    with the KME as this gateway's peer.",
        "config vpn qkd",
        f"    edit {q(qkd)}",
        f"        set server {q(t.host)}",
        f"        set port {t.port}",
        f"        set id {q(t.sae_id)}",
        f"        set peer {q(peer)}",
        f"        set certificate {q(cert)}",
        f"        set comment {q(f'kme {t.kme_id} at {t.url}')}",
        "    next",
        "end",
        "# 4. Use the KME keys in your existing tunnel (both gateways need qkd enabled).",
        "#    FortiOS 7.6+/8.0 also offer  set qkd-hybrid {disable|allow|require}",
        "#    (not in the 7.4.4 CLI reference).",
        "config vpn ipsec phase1-interface",
        '    edit "<phase1-name>"',
        "        set qkd require",
        f"        set qkd-profile {q(qkd)}",
        "    next",
        "end",
    ]


# -- Junos ---------------------------------------------------------------------------------


def _junos(t: KMETarget) -> list[str]:
    ca, cert = _name("kme-ca-", t.kme_id, 32), _name("kme-sae-", t.sae_id, 32)
    profile = _name("kme-", t.sae_id, 32)
    remote = {"ca": f"{ca}.pem", "cert": f"{cert}.pem", "key": f"{cert}.key"}
    qkm = f"set security key-manager profiles {profile} quantum-key-manager"
    q = _quote
    return [
        *_header("Junos (SRX): Junos Key Manager quantum-key-manager + PPK", t, JUNOS_DOCS),
        *_files(t),
        "# 1. Copy them to the device (on this host):",
        *_scp(
            [(t.ca_file, remote["ca"]), (t.cert_file, remote["cert"]), (t.key_file, remote["key"])],
            "<user>@<srx-address>:/var/tmp/",
        ),
        "#    then, on the device: a CA profile, and load the CA and the local certificate.",
        "configure",
        f"set security pki ca-profile {ca} ca-identity {ca}",
        "commit and-quit",
        f"request security pki ca-certificate load ca-profile {ca} filename /var/tmp/{remote['ca']}",
        f"request security pki local-certificate load certificate-id {cert} "
        f"filename /var/tmp/{remote['cert']} key /var/tmp/{remote['key']}",
        "# 2. The key manager profile. UNCONFIRMED statement names: url, local-sae-id,",
        "#    local-certificate-id, trusted-cas, peer-sae-ids (check with ? on your release).",
        "configure",
        f"{qkm} url {q(t.url)}",
        f"{qkm} local-sae-id {q(t.sae_id)}",
        f"{qkm} local-certificate-id {cert}",
        f"{qkm} trusted-cas {ca}",
        f"{qkm} peer-sae-ids {q(_peer(t))}",
        "# 3. Use its keys as RFC 8784 PPKs on your existing IKEv2 gateway.",
        "set security ike gateway <ike-gateway> version v2-only",
        f"set security ike gateway <ike-gateway> ppk-profile {profile}",
        "commit",
    ]


# -- MikroTik ------------------------------------------------------------------------------


def _mikrotik(t: KMETarget) -> list[str]:
    ca, cert = _name("kme-ca-", t.kme_id, 48), _name("kme-sae-", t.sae_id, 48)
    remote = {"ca": f"{ca}.pem", "cert": f"{cert}.pem", "key": f"{cert}.key"}
    profile = _name("kme-ppk-", t.sae_id, 48)
    return [
        *_header("MikroTik RouterOS 7: IPsec PPK from a QKD KME (ppk=qkd)", t, MIKROTIK_DOCS),
        *_files(t),
        "# 1. Upload them to the router (WinBox: Files, drag and drop; or from this host):",
        *_scp(
            [(t.ca_file, remote["ca"]), (t.cert_file, remote["cert"]), (t.key_file, remote["key"])],
            "<admin>@<router-address>:/",
        ),
        "#    then import them; RouterOS names each certificate after its file plus _0.",
        *(
            f"/certificate import file-name={_ros(name)} passphrase={_ros('')}"
            for name in remote.values()
        ),
        f"# 2. The KME client. key-size is in BYTES ({t.key_size_bits} bits); kme-id is",
        "#    the KME certificate identity RouterOS checks.",
        f"/ip ipsec key qkd set address={_hostport(t.host, t.port)}"
        f" certificate={_ros(remote['cert'] + '_0')} key-size={t.key_size_bits // 8}"
        f" kme-id={_ros(t.kme_id)} peer-sae-id={_ros(_peer(t))}",
        "# 3. A profile whose PPK comes from the KME; attach it to your existing IKEv2 peer",
        "#    and its identity, as MikroTik's QKD example does.",
        f"/ip ipsec profile add name={_ros(profile)} ppk=qkd",
        f'/ip ipsec peer set [find name="<ipsec-peer>"] exchange-mode=ike2 profile={_ros(profile)}',
        f'/ip ipsec identity set [find peer="<ipsec-peer>"] profile={_ros(profile)}',
    ]
