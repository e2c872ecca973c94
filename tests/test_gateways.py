"""`kme.ipsec.gateways`: FortiOS, Junos and MikroTik configurations against this kme.

No server runs here: each test renders a configuration for a `KMETarget` built on files in
``tmp_path`` and parses the text the way the gateway's CLI would read it (blocks, quoted
strings with backslash escapes, ``key=value`` parameters), then checks that every value
landed where the vendor's documented syntax puts it.

Sources (the same URLs the rendered headers print):

- FORTI_CLI: Fortinet, FortiOS 7.4.2 CLI Reference, "config vpn qkd",
  https://docs.fortinet.com/document/fortigate/7.4.2/cli-reference/320620
- FORTI_GUIDE: Fortinet, FortiOS 7.6.6 Administration Guide, "IPsec key retrieval with a QKD
  system using the ETSI standardized API",
  https://docs.fortinet.com/document/fortigate/7.6.6/administration-guide/775314
- FORTI_P1: Fortinet, FortiOS 8.0.0 CLI Reference, "config vpn ipsec phase1-interface"
  (qkd, qkd-hybrid, qkd-profile) and 7.4.4's (qkd, qkd-profile only).
- FORTI_PEER: Fortinet, FortiOS 7.4.1 CLI Reference, "config user peer",
  https://docs.fortinet.com/document/fortigate/7.4.1/cli-reference/482620
- FORTI_CERT: Fortinet CLI Reference "config vpn certificate local",
  https://docs.fortinet.com/document/fortigate/7.0.8/cli-reference/354620, and the
  fortios_vpncertificate_ca Terraform reference ("ca - CA certificate as a PEM file").
- JUNOS: Juniper, "Quantum Safe IPsec VPN",
  https://www.juniper.net/documentation/us/en/software/junos/vpn-ipsec/topics/topic-map/quantum-safe-ipsec-vpn.html
  (``security ike gateway <GW> ppk-profile <P>``, ``security key-manager profiles``), and
  Juniper PKI usage ``request security pki ca-certificate load ca-profile .. filename ..`` /
  ``request security pki local-certificate load certificate-id .. filename .. key ..``.
- ROS_QKD: MikroTik, "QKD Integration in RouterOS IPsec (PPK)",
  https://help.mikrotik.com/docs/spaces/ROS/pages/341770268/QKD
- ROS_SCRIPT: MikroTik, "Manual:Scripting" (string escapes \\" \\\\ \\$ \\?),
  https://wiki.mikrotik.com/wiki/Manual:Scripting
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from kme.ipsec.gateways import VENDORS, KMETarget, render

TRICKY_SAE = 'Site A "east" gw'


def target(tmp_path: Path, **changes: Any) -> KMETarget:
    pki = tmp_path / "pki dir"
    pki.mkdir(exist_ok=True)
    for name in ("ca.pem", "sae-a.pem", "sae-a.key"):
        (pki / name).write_text("-----BEGIN X-----\n-----END X-----\n")
    values: dict[str, Any] = {
        "kme_id": "KME_A",
        "host": "kme.example.net",
        "port": 8443,
        "sae_id": "SAE_A",
        "peer_sae_id": "SAE_B",
        "ca_file": pki / "ca.pem",
        "cert_file": pki / "sae-a.pem",
        "key_file": pki / "sae-a.key",
        "key_size_bits": 256,
    }
    values.update(changes)
    return KMETarget(**values)


def tokens(line: str) -> list[str]:
    """Split a CLI line on blanks; double quotes group, and a backslash escapes a character."""
    out: list[str] = []
    word: list[str] = []
    started = quoted = escaped = False
    for char in line:
        if escaped:
            word.append(char)
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted, started = not quoted, True
        elif char.isspace() and not quoted:
            if started:
                out.append("".join(word))
            word, started = [], False
        else:
            word.append(char)
            started = True
    assert not quoted, f"unbalanced quoting in {line!r}"
    assert not escaped, f"dangling backslash in {line!r}"
    if started:
        out.append("".join(word))
    return out


def commands(text: str) -> list[str]:
    """The lines a device executes: neither blank nor a '#' comment."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def comments(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#")]


# -- common ---------------------------------------------------------------------------------


def test_unknown_vendor_raises(tmp_path: Path) -> None:
    """render() knows exactly fortios, junos and mikrotik; anything else (other vendors,
    other spellings) is a ValueError that names the choices. (The issue's vendor list.)"""
    assert VENDORS == ("fortios", "junos", "mikrotik")
    for vendor in ("cisco", "FortiOS", "strongswan", ""):
        with pytest.raises(ValueError, match="fortios, junos, mikrotik"):
            render(vendor, target(tmp_path))


def test_header_names_kme_sae_url_and_sources(tmp_path: Path) -> None:
    """Every rendering opens with comment lines naming the KME ID, the SAE ID, the
    https://host:port URL and the documentation URL its syntax follows (FORTI_CLI, JUNOS,
    ROS_QKD); the header is only comments, so pasting it is harmless."""
    t = target(tmp_path)
    sources = {"fortios": "docs.fortinet.com", "junos": "juniper.net", "mikrotik": "mikrotik.com"}
    for vendor in VENDORS:
        text = render(vendor, t)
        head = text.split("\n\n")[0].splitlines()[:6]
        assert all(line.startswith("#") for line in head)
        joined = "\n".join(head)
        assert "KME_A" in joined
        assert "SAE_A" in joined
        assert "https://kme.example.net:8443" in joined
        assert sources[vendor] in "\n".join(comments(text))
        for path in (t.ca_file, t.cert_file, t.key_file):
            assert str(path) in text


def test_missing_peer_sae_renders_a_placeholder(tmp_path: Path) -> None:
    """peer_sae_id=None never invents a peer: each vendor shows <peer-sae-id> (Junos
    peer-sae-ids and RouterOS peer-sae-id carry it; FortiOS, whose ``config vpn qkd`` has no
    peer SAE field per FORTI_CLI, names it in a comment) plus a REPLACE note; with a peer
    given, no placeholder is left."""
    for vendor in VENDORS:
        text = render(vendor, target(tmp_path, peer_sae_id=None))
        assert "<peer-sae-id>" in text
        assert "REPLACE <peer-sae-id>" in text
        known = render(vendor, target(tmp_path))
        assert "<peer-sae-id>" not in known
        assert "SAE_B" in known
    assert 'peer-sae-ids "<peer-sae-id>"' in render("junos", target(tmp_path, peer_sae_id=None))
    ros = render("mikrotik", target(tmp_path, peer_sae_id=None))
    assert 'peer-sae-id="<peer-sae-id>"' in ros


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"key_size_bits": 250}, "multiple of 8"),
        ({"key_size_bits": 0}, "multiple of 8"),
        ({"sae_id": "a\nset x"}, "control"),
        ({"peer_sae_id": ""}, "empty"),
        ({"host": "kme host"}, "host"),
    ],
)
def test_target_rejects_values_no_config_can_carry(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    """A port outside 1..65535 (FORTI_CLI: port 1-65535), a key size that is no whole
    number of bytes (ROS_QKD: key-size in bytes), a newline that would start a new CLI
    command, an empty peer ID or a host with a blank is a ValueError, not a broken config."""
    with pytest.raises(ValueError, match=message):
        target(tmp_path, **change)


# -- FortiOS --------------------------------------------------------------------------------


def forti_blocks(text: str) -> dict[str, dict[str, dict[str, str]]]:
    """Parse config/edit/set/next/end, failing on any unbalanced or misplaced line."""
    blocks: dict[str, dict[str, dict[str, str]]] = {}
    section: str | None = None
    entry: dict[str, str] | None = None
    for line in commands(text):
        words = tokens(line)
        if words[0] == "config":
            assert section is None, line
            assert entry is None, line
            section = " ".join(words[1:])
            blocks.setdefault(section, {})
        elif words[0] == "edit":
            assert section is not None, line
            assert entry is None, line
            assert len(words) == 2, line
            entry = blocks[section].setdefault(words[1], {})
        elif words[0] == "set":
            assert entry is not None, line
            assert len(words) == 3, line
            entry[words[1]] = words[2]
        elif words[0] == "next":
            assert entry is not None, line
            entry = None
        elif words[0] == "end":
            assert section is not None, line
            assert entry is None, line
            section = None
        else:
            pytest.fail(f"not FortiOS config syntax: {line!r}")
    assert section is None, "a config block is left open"
    assert entry is None, "an edit is left open"
    return blocks


def test_fortios_blocks_are_balanced_and_complete(tmp_path: Path) -> None:
    """The output is only ``config``/``edit "..."``/``set``/``next``/``end`` lines, each
    ``config`` closed by ``end`` and each ``edit`` by ``next`` (FORTI_CLI syntax block), in
    the five tables FortiOS needs: vpn certificate ca and local (FORTI_CERT), user peer
    (FORTI_PEER), vpn qkd (FORTI_CLI) and vpn ipsec phase1-interface (FORTI_P1)."""
    blocks = forti_blocks(render("fortios", target(tmp_path)))
    assert set(blocks) == {
        "vpn certificate ca",
        "vpn certificate local",
        "user peer",
        "vpn qkd",
        "vpn ipsec phase1-interface",
    }


def test_fortios_qkd_profile_points_at_kme_sae_and_certificates(tmp_path: Path) -> None:
    """``config vpn qkd``: server = the host, port = the port, id = this gateway's SAE ID,
    peer = a ``config user peer`` entry whose ca is the imported KME CA and whose cn is the
    KME ID, certificate = the imported local certificate (FORTI_CLI, FORTI_GUIDE example
    ``set server/port/id/peer/certificate``, FORTI_PEER ``set ca``/``set cn``); the CA and
    local certificate entries take the given files' contents (FORTI_CERT ``set ca``,
    ``set private-key``, ``set certificate``)."""
    t = target(tmp_path)
    blocks = forti_blocks(render("fortios", t))
    [(name, qkd)] = blocks["vpn qkd"].items()
    assert qkd["server"] == "kme.example.net"
    assert qkd["port"] == "8443"
    assert qkd["id"] == "SAE_A"
    peer = blocks["user peer"][qkd["peer"]]
    assert peer["cn"] == "KME_A"
    assert blocks["vpn certificate ca"][peer["ca"]] == {"ca": f"<contents of {t.ca_file}>"}
    local = blocks["vpn certificate local"][qkd["certificate"]]
    assert local == {
        "private-key": f"<contents of {t.key_file}>",
        "certificate": f"<contents of {t.cert_file}>",
    }
    assert "KME_A" in qkd["comment"]
    assert t.url in qkd["comment"]
    assert len(name) <= 35  # FORTI_CLI: name maximum length 35


def test_fortios_phase1_requires_qkd_from_that_profile(tmp_path: Path) -> None:
    """The tunnel part edits the user's own phase1-interface (placeholder <phase1-name>)
    with ``set qkd require`` and ``set qkd-profile`` naming the vpn qkd entry (FORTI_P1:
    qkd {disable|allow|require}, qkd-profile string); qkd-hybrid, absent from the 7.4.4
    reference, appears only as a comment."""
    text = render("fortios", target(tmp_path))
    blocks = forti_blocks(text)
    phase1 = blocks["vpn ipsec phase1-interface"]
    assert list(phase1) == ["<phase1-name>"]
    assert phase1["<phase1-name>"] == {
        "qkd": "require",
        "qkd-profile": next(iter(blocks["vpn qkd"])),
    }
    assert all("qkd-hybrid" not in line for line in commands(text))
    assert any("qkd-hybrid {disable|allow|require}" in line for line in comments(text))


def test_fortios_quotes_sae_ids_and_sanitises_names(tmp_path: Path) -> None:
    """An SAE ID with blanks and double quotes is written as one double-quoted value with
    backslash-escaped quotes (Fortinet CLI syntax: strings with spaces go in quotation
    marks, \\ escapes) and reads back unchanged; object names derived from it keep only
    letters, digits, '_' and '-' and at most 35 characters (FORTI_CLI name max length)."""
    t = target(tmp_path, sae_id=TRICKY_SAE, kme_id="KME with a very long name, really very long")
    text = render("fortios", t)
    assert '        set id "Site A \\"east\\" gw"' in text.splitlines()
    blocks = forti_blocks(text)
    [qkd] = blocks["vpn qkd"].values()
    assert qkd["id"] == TRICKY_SAE
    names = [name for table in blocks.values() for name in table if name != "<phase1-name>"]
    assert names
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,35}", name) for name in names)
    assert blocks["user peer"][qkd["peer"]]["cn"] == t.kme_id


# -- Junos ----------------------------------------------------------------------------------


def junos_settings(text: str) -> list[list[str]]:
    return [tokens(line) for line in commands(text) if line.startswith("set ")]


def test_junos_lines_are_set_commands_or_documented_operations(tmp_path: Path) -> None:
    """Every executed line is a ``set ...`` configuration statement, ``configure``,
    ``commit``/``commit and-quit``, or one of the two documented PKI loads (JUNOS; Juniper
    PKI ``request security pki ... load``); file transfers are comments run on this host."""
    text = render("junos", target(tmp_path))
    for line in commands(text):
        assert (
            line in {"configure", "commit", "commit and-quit"}
            or line.startswith("set ")
            or line.startswith("request security pki ca-certificate load ca-profile ")
            or line.startswith("request security pki local-certificate load certificate-id ")
        ), line
    assert commands(text)[-1] == "commit"


def test_junos_pki_loads_the_copied_files(tmp_path: Path) -> None:
    """The three files are copied with scp to /var/tmp (local paths shell-quoted, since the
    test directory has a blank), a ca-profile is configured and committed before
    ``request security pki ca-certificate load ca-profile <CA> filename <F>``, and the client
    certificate and key are loaded with ``request security pki local-certificate load
    certificate-id <ID> filename <F> key <K>`` (JUNOS, Juniper PKI load syntax)."""
    t = target(tmp_path)
    text = render("junos", t)
    copies = {}
    for line in comments(text):
        if line.lstrip("# ").startswith("scp "):
            _, local, remote = shlex.split(line.lstrip("# "))
            copies[Path(local)] = remote.split(":", 1)[1]
    assert set(copies) == {t.ca_file, t.cert_file, t.key_file}
    lines = commands(text)
    ca_load = next(tokens(x) for x in lines if x.startswith("request security pki ca-certificate"))
    ca_profile = ca_load[ca_load.index("ca-profile") + 1]
    assert ca_load[ca_load.index("filename") + 1] == copies[t.ca_file]
    profile_line = f"set security pki ca-profile {ca_profile} ca-identity {ca_profile}"
    assert (
        lines.index(profile_line) < lines.index("commit and-quit") < lines.index(" ".join(ca_load))
    )
    local = next(tokens(x) for x in lines if x.startswith("request security pki local-certificate"))
    assert local[local.index("filename") + 1] == copies[t.cert_file]
    assert local[local.index("key") + 1] == copies[t.key_file]


def test_junos_key_manager_profile_and_ppk_profile(tmp_path: Path) -> None:
    """``set security key-manager profiles <P> quantum-key-manager`` carries the KME URL
    https://host:port, the local SAE ID, the loaded certificate-id, the configured CA
    profile and the peer SAE ID, and ``set security ike gateway <ike-gateway> ppk-profile
    <P>`` (with version v2-only, RFC 8784 being IKEv2-only) names that same profile (JUNOS;
    the brief's url/local SAE ID/local certificate/trusted CAs; leaf names UNCONFIRMED)."""
    t = target(tmp_path, sae_id=TRICKY_SAE)
    text = render("junos", t)
    qkm: dict[str, str] = {}
    profiles = set()
    for words in junos_settings(text):
        if words[:4] == ["set", "security", "key-manager", "profiles"]:
            assert words[5] == "quantum-key-manager", words
            assert len(words) == 8, words
            profiles.add(words[4])
            qkm[words[6]] = words[7]
    [profile] = profiles
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,32}", profile)
    assert qkm["url"] == "https://kme.example.net:8443"
    assert qkm["local-sae-id"] == TRICKY_SAE
    assert qkm["peer-sae-ids"] == "SAE_B"
    assert f"certificate-id {qkm['local-certificate-id']} " in text
    assert f"set security pki ca-profile {qkm['trusted-cas']} " in text
    assert 'local-sae-id "Site A \\"east\\" gw"' in text
    gateway = [w for w in junos_settings(text) if w[:3] == ["set", "security", "ike"]]
    assert gateway == [
        ["set", "security", "ike", "gateway", "<ike-gateway>", "version", "v2-only"],
        ["set", "security", "ike", "gateway", "<ike-gateway>", "ppk-profile", profile],
    ]


# -- MikroTik -------------------------------------------------------------------------------


def ros_params(line: str) -> dict[str, str]:
    words = tokens(line)
    params = [w for w in words if "=" in w and not w.startswith("[")]
    return dict(w.split("=", 1) for w in params)


def test_mikrotik_qkd_key_settings(tmp_path: Path) -> None:
    """``/ip ipsec key qkd set address=<IP>:<port> certificate=<imported client cert>
    key-size=<BYTES> kme-id=<KME ID> peer-sae-id=<peer SAE>`` exactly as ROS_QKD section 5.3
    shows it (a ``set`` on a single item; key-size "in bytes (e.g., 32 bytes = 256 bits)"),
    so 256 bits renders key-size=32 and 512 bits key-size=64."""
    for bits, size in ((256, "32"), (512, "64")):
        text = render("mikrotik", target(tmp_path, key_size_bits=bits, host="192.0.2.7"))
        [line] = [x for x in commands(text) if x.startswith("/ip ipsec key qkd ")]
        assert tokens(line)[:5] == ["/ip", "ipsec", "key", "qkd", "set"]
        params = ros_params(line)
        assert set(params) == {"address", "certificate", "key-size", "kme-id", "peer-sae-id"}
        assert params["address"] == "192.0.2.7:8443"
        assert params["key-size"] == size
        assert params["kme-id"] == "KME_A"
        assert params["peer-sae-id"] == "SAE_B"
        imported = [
            ros_params(x)["file-name"]
            for x in commands(text)
            if x.startswith("/certificate import")
        ]
        assert params["certificate"] in {name + "_0" for name in imported}


def test_mikrotik_uploads_and_imports_the_three_files(tmp_path: Path) -> None:
    """The CA, client certificate and key are uploaded (scp from this host, local paths
    quoted) and each is imported with ``/certificate import file-name=... passphrase=""``
    (ROS_QKD 5.1); the client certificate named in the qkd settings is the imported
    certificate file plus "_0", RouterOS's name for an imported certificate."""
    t = target(tmp_path)
    text = render("mikrotik", t)
    uploads = {}
    for line in comments(text):
        if line.lstrip("# ").startswith("scp "):
            _, local, remote = shlex.split(line.lstrip("# "))
            uploads[Path(local)] = remote.split(":/", 1)[1]
    assert set(uploads) == {t.ca_file, t.cert_file, t.key_file}
    imports = [ros_params(x) for x in commands(text) if x.startswith("/certificate import ")]
    assert imports == [
        {"file-name": uploads[p], "passphrase": ""} for p in (t.ca_file, t.cert_file, t.key_file)
    ]
    [qkd] = [x for x in commands(text) if x.startswith("/ip ipsec key qkd ")]
    assert ros_params(qkd)["certificate"] == uploads[t.cert_file] + "_0"


def test_mikrotik_profile_uses_ppk_qkd_on_the_users_peer(tmp_path: Path) -> None:
    """``/ip ipsec profile add name=... ppk=qkd`` (ROS_QKD 5.4: ppk option "qkd: Keys
    retrieved from QKD server"), attached to the user's own IKEv2 peer and identity, which
    stay placeholders (<ipsec-peer>)."""
    text = render("mikrotik", target(tmp_path))
    [profile] = [ros_params(x) for x in commands(text) if x.startswith("/ip ipsec profile add ")]
    assert profile["ppk"] == "qkd"
    peer = [x for x in commands(text) if x.startswith("/ip ipsec peer set ")]
    assert peer == [
        f'/ip ipsec peer set [find name="<ipsec-peer>"] exchange-mode=ike2 profile="{profile["name"]}"'
    ]
    ident = [x for x in commands(text) if x.startswith("/ip ipsec identity set ")]
    assert ident == [
        f'/ip ipsec identity set [find peer="<ipsec-peer>"] profile="{profile["name"]}"'
    ]


def test_mikrotik_escapes_quotes_dollars_and_question_marks(tmp_path: Path) -> None:
    """RouterOS strings escape \\" and \\\\, and also \\$ (else a variable) and \\? (else
    console help) (ROS_SCRIPT); an awkward peer SAE ID reads back unchanged, and names made
    from SAE IDs keep only safe characters."""
    awkward = 'peer "B" $x? \\ end'
    text = render("mikrotik", target(tmp_path, sae_id=TRICKY_SAE, peer_sae_id=awkward))
    [qkd] = [x for x in commands(text) if x.startswith("/ip ipsec key qkd ")]
    assert 'peer-sae-id="peer \\"B\\" \\$x\\? \\\\ end"' in qkd
    assert ros_params(qkd)["peer-sae-id"] == awkward
    [profile] = [ros_params(x) for x in commands(text) if x.startswith("/ip ipsec profile add ")]
    assert re.fullmatch(r"[A-Za-z0-9_-]+", profile["name"])


def test_ipv6_kme_host_is_bracketed(tmp_path: Path) -> None:
    """An IPv6 literal host is bracketed wherever it is joined to the port (RFC 3986 URL
    syntax for the Junos url and headers, host:port for RouterOS address; UNCONFIRMED for
    RouterOS, whose QKD page shows only IPv4:port), while FortiOS takes it bare in
    ``set server`` (FORTI_CLI: "IPv4, IPv6 or DNS address of the KME")."""
    t = target(tmp_path, host="2001:db8::7")
    assert t.url == "https://[2001:db8::7]:8443"
    assert 'url "https://[2001:db8::7]:8443"' in render("junos", t)
    assert "address=[2001:db8::7]:8443 " in render("mikrotik", t)
    assert 'set server "2001:db8::7"' in render("fortios", t)
