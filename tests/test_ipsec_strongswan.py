"""The strongSwan PPK adapter against real charon daemons and a real kme (issue 3).

Two charons in their own network namespaces, one kme over mutual TLS, and one
`kme ipsec strongswan` process per site, exactly as an operator would run them. The IKE
SAs are childless (the PPK enters the IKE SA's keys; no kernel ESP is needed).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kmetest import DatabaseTemplates, RunningKME, RunPKI, make_settings, running_kme
from tests.strongswan_lab import (
    IKE_PSK,
    PROPOSAL,
    StrongSwanLab,
    stop_process,
    unavailable_reason,
)

MODES = {mode: unavailable_reason(mode) for mode in ("netns", "loopback")}
# Every scenario runs in namespaces where they are permitted, else on loopback; the main
# scenario runs in both, so the fallback is proven wherever it can run.
PREFERRED = "netns" if MODES["netns"] is None else "loopback"
pytestmark = pytest.mark.skipif(
    all(MODES.values()),
    reason=f"real strongSwan lab: namespaces: {MODES['netns']}; loopback: {MODES['loopback']}",
)
ONE_MODE = pytest.mark.parametrize("lab", [PREFERRED], indirect=True)

KEY_IDS = re.compile(r"enc_keys: SAE_A -> [^:]+: 1 keys of \d+ bits, key_IDs \['([0-9a-f-]{36})'\]")
CONNECTION = "qkd"


def toml(value: Any, prefix: str = "") -> str:
    """A small TOML writer for the adapter configurations these tests make."""

    def scalar(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int | float):
            return repr(item)
        if isinstance(item, list):
            return "[" + ", ".join(scalar(x) for x in item) + "]"
        return json.dumps(str(item))

    lines, tables = [], []
    for key, item in value.items():
        if isinstance(item, dict):
            tables.append((key, item))
        elif isinstance(item, list) and item and isinstance(item[0], dict):
            for entry in item:
                plain = {k: v for k, v in entry.items() if not isinstance(v, dict)}
                nested = {k: v for k, v in entry.items() if isinstance(v, dict)}
                lines.append(f"\n[[{prefix}{key}]]")
                lines.append(toml(plain, f"{prefix}{key}.").strip())
                for sub, subitem in nested.items():
                    lines.append(toml({sub: subitem}, f"{prefix}{key}.").strip())
        else:
            lines.append(f"{key} = {scalar(item)}")
    for key, item in tables:
        lines.append(f"\n[{prefix}{key}]")
        lines.append(toml(item, f"{prefix}{key}."))
    return "\n".join(line for line in lines if line) + "\n"


def conn(lab: StrongSwanLab, local: str, remote: str) -> dict[str, Any]:
    here, there = lab.sites[local], lab.sites[remote]
    return {
        "version": "2",
        "local_addrs": [here.address],
        "remote_addrs": [there.address],
        "proposals": [PROPOSAL],
        "childless": "force",
        "local": {"auth": "psk", "id": here.ike_id},
        "remote": {"auth": "psk", "id": there.ike_id},
        **lab.conn_ports(local, remote),
    }


class AdapterProcess:
    """`kme ipsec strongswan --config FILE` as a subprocess, logging to a file."""

    def __init__(self, name: str, config: dict[str, Any], root: Path) -> None:
        self.name = name
        self.root = root
        self.config_file = root / f"adapter-{name}.toml"
        self.config_file.write_text(toml(config))
        self.log_file = root / f"adapter-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> None:
        self.started_at = time.monotonic()
        with self.log_file.open("ab") as output:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kme.cli",
                    "ipsec",
                    "strongswan",
                    "--config",
                    str(self.config_file),
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_process(process)


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module", params=["netns", "loopback"])
def lab(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StrongSwanLab]:
    reason = MODES[request.param]
    if reason is not None:
        pytest.skip(f"strongSwan lab in {request.param} mode: {reason}")
    made = StrongSwanLab(tmp_path_factory.mktemp(f"swan-{request.param}"), request.param)
    try:
        made.up()
        yield made
    finally:
        made.close()


@pytest.fixture
async def kme_for_ipsec(
    tmp_path: Path, test_pki: RunPKI, templates: DatabaseTemplates
) -> AsyncIterator[RunningKME]:
    url = await templates.sqlite(tmp_path / "kme.db")
    async with running_kme(make_settings(test_pki, url), test_pki, fill=100) as running:
        yield running


class Sites:
    """Builds the two adapters' configurations for one test and stops them afterwards."""

    def __init__(self, lab: StrongSwanLab, kme: RunningKME, root: Path) -> None:
        self.lab, self.kme, self.root = lab, kme, root
        self.port = free_port()
        self.adapters: list[AdapterProcess] = []

    def adapter(self, site: str, label: str | None = None, **overrides: Any) -> AdapterProcess:
        pki = self.kme.pki
        me, other = ("SAE_A", "SAE_B") if site == "a" else ("SAE_B", "SAE_A")
        remote = "b" if site == "a" else "a"
        config: dict[str, Any] = {
            "role": "initiator" if site == "a" else "responder",
            "name": f"site-{site}",
            "retry_initial": 0.2,
            "retry_max": 1.0,
            "check_seconds": 0.3,
            "kme": {
                "url": self.kme.base_url,
                "ca_file": str(pki.ca_file),
                "certfile": str(pki.saes[me].cert),
                "keyfile": str(pki.saes[me].key),
            },
            "peer": {"sae_id": other, "identity": other, "ca_file": str(pki.ca_file)},
            "charon": {"vici": str(self.lab.sites[site].vici_socket)},
            "connections": [
                {
                    "name": CONNECTION,
                    "psk": IKE_PSK,
                    "psk_owners": [self.lab.sites["a"].ike_id, self.lab.sites["b"].ike_id],
                    "rotate_seconds": 3600,
                    "initiate_timeout_ms": 5000,
                    "conn": conn(self.lab, site, remote),
                }
            ],
        }
        if site == "a":
            config["peer"]["url"] = f"https://127.0.0.1:{self.port}"
        else:
            config["listen"] = {"host": "127.0.0.1", "port": self.port}
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            elif key == "connection":
                config["connections"][0].update(value)
            else:
                config[key] = value
        adapter = AdapterProcess(label or site, config, self.root)
        self.adapters.append(adapter)
        return adapter

    def stop(self) -> None:
        for adapter in self.adapters:
            adapter.stop()


@pytest.fixture
def sites(lab: StrongSwanLab, kme_for_ipsec: RunningKME, tmp_path: Path) -> Iterator[Sites]:
    made = Sites(lab, kme_for_ipsec, tmp_path)
    try:
        yield made
    finally:
        made.stop()
        lab.reset()


async def wait_for(condition: Any, seconds: float = 20.0, what: str = "condition") -> Any:
    """Poll `condition()` (bounded) until it returns something truthy."""
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / 0.05) + 1):
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def ppk_sas(lab: StrongSwanLab, site: str) -> list[dict[str, str]]:
    return [sa for sa in lab.ike_sas(site) if sa["state"] == "ESTABLISHED" and sa["ppk"] == "yes"]


def issued_key_ids(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [match for record in caplog.records for match in KEY_IDS.findall(record.getMessage())]


def both_up(lab: StrongSwanLab) -> bool:
    return len(ppk_sas(lab, "a")) == 1 and len(ppk_sas(lab, "b")) == 1


ESTABLISHED = re.compile(r"ESTABLISHED with PPK_ID ([0-9a-f-]{36}) in (\d+) ms")


async def test_ppk_sa_comes_up_and_rotates_make_before_break(
    lab: StrongSwanLab,
    sites: Sites,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 3 items 1 and 2: both daemons hold an ESTABLISHED IKE SA with `ppk: yes` whose
    PPK_ID is the key_ID the KME issued; a rotation brings up a new SA under a new key_ID
    before the old one goes, retires the old PPK on both sides, the KME's pool shows
    exactly the keys consumed, and no key's material is in any log or file the adapters
    or daemons wrote."""
    from kme.keys import pool

    materials: list[bytes] = []
    reserve = pool.reserve

    async def recording(*args: Any, **kwargs: Any) -> list[pool.Key]:
        keys = await reserve(*args, **kwargs)
        materials.extend(key.material for key in keys)
        return keys

    monkeypatch.setattr(pool, "reserve", recording)
    caplog.set_level(logging.INFO, logger="kme")
    kme = sites.kme
    before = await kme.stored_blocks()
    responder = sites.adapter("b")
    initiator = sites.adapter("a", connection={"rotate_seconds": 3})
    responder.start()
    # The responder listens first, so no key is spent on a delivery that cannot happen
    # (the pool's accounting below is exact).
    await wait_for(lambda: port_open(sites.port), what="the responder's peer channel")
    initiator.start()

    await wait_for(lambda: both_up(lab), what="the first PPK-protected IKE SA")
    first_up = time.monotonic() - initiator.started_at
    first = issued_key_ids(caplog)
    assert len(first) == 1, first
    for site in ("a", "b"):
        assert f"using PPK for PPK_ID '{first[0]}'" in lab.sites[site].log()
    old = {site: ppk_sas(lab, site)[0]["uniqueid"] for site in ("a", "b")}

    def rotated() -> bool:
        return (
            len(issued_key_ids(caplog)) >= 2
            and all(len(lab.ike_sas(site)) == 1 for site in ("a", "b"))
            and all(
                [sa["uniqueid"] for sa in ppk_sas(lab, site)] not in ([], [old[site]])
                for site in ("a", "b")
            )
        )

    await wait_for(rotated, what="a rotation: one new PPK SA per daemon, the old one gone")
    second = issued_key_ids(caplog)[1]
    assert second != first[0]
    for site in ("a", "b"):
        assert f"using PPK for PPK_ID '{second}'" in lab.sites[site].log()
    # The spent PPK is unloaded on both sides; only the current one is held.
    await wait_for(
        lambda: all(f"kme-ppk-{first[0]}" not in lab.shared_ids(s) for s in ("a", "b")),
        what="the spent PPK to be unloaded",
    )
    for site in ("a", "b"):
        assert f"kme-ppk-{second}" in lab.shared_ids(site)

    initiator.stop()
    responder.stop()
    issued = issued_key_ids(caplog)
    assert await kme.stored_blocks() == before - len(issued)
    assert await kme.delivered_rows() == 0  # every issued key reached the responder
    for text in (initiator.log(), responder.log()):
        assert "Traceback" not in text
    assert len(materials) == len(issued)
    written = [  # everything the adapters and daemons wrote (the KME's own database aside)
        path
        for root in (sites.root, lab.root)
        for path in root.rglob("*")
        if path.is_file() and not path.name.startswith("kme.db")
    ]
    for material in materials:
        for path in written:
            data = path.read_bytes()
            for spelling in (material, base64.b64encode(material), material.hex().encode()):
                assert spelling not in data, f"key material in {path}"
    # Make-before-break, in the adapter's own order: the new SA was up before the old
    # one was closed and its PPK retired.
    log_a = initiator.log()
    assert log_a.index(f"ESTABLISHED with PPK_ID {second}") < log_a.index(f"PPK {first[0]} retired")
    timings = dict(ESTABLISHED.findall(initiator.log()))
    with capsys.disabled():
        print(
            f"\n[ipsec timing] adapter process start -> PPK SA ESTABLISHED on both daemons: "
            f"{first_up * 1000:.0f} ms; first SA key fetch -> SA up {timings[first[0]]} ms; "
            f"rotation key fetch -> new SA up {timings[second]} ms"
        )


@ONE_MODE
async def test_responder_whose_kme_refuses_the_key_leaves_no_sa(
    lab: StrongSwanLab, sites: Sites
) -> None:
    """Issue 3 item 2: when the responder's KME refuses the key (the initiator asked for
    keys for another SAE, so SAE_B may not have them: 401), no IKE SA comes up on either
    daemon, the initiator's log says why, and it keeps retrying."""
    responder = sites.adapter("b")
    initiator = sites.adapter("a", peer={"sae_id": "SAE_C"})
    responder.start()
    initiator.start()
    await wait_for(
        lambda: initiator.log().count("responder's KME refused the key: KME answered 401") >= 2,
        what="two refused attempts in the initiator's log",
    )
    assert lab.ike_sas("a") == []
    assert lab.ike_sas("b") == []
    assert "own KME refused dec_keys: KME answered 401" in responder.log()
    # No PPK was loaded for a key the responder could not get.
    assert not [
        key for key in lab.shared_ids("a") + lab.shared_ids("b") if key.startswith("kme-ppk-")
    ]


@ONE_MODE
async def test_mismatched_key_material_fails_authentication(
    lab: StrongSwanLab, sites: Sites
) -> None:
    """Issue 3 item 2: a responder holding different material under the same key_ID (fault
    injection corrupts its PPK) makes IKE_AUTH fail: no SA, the reason in the log."""
    responder = sites.adapter("b", faults={"corrupt_ppk": True})
    initiator = sites.adapter("a")
    responder.start()
    initiator.start()
    await wait_for(
        lambda: (
            "AUTHENTICATION_FAILED" in initiator.log() or "MAC mismatched" in lab.sites["b"].log()
        ),
        what="an authentication failure",
    )
    await wait_for(
        lambda: "no new IKE SA" in initiator.log(), what="the initiator to log the failure"
    )
    initiator.stop()
    assert lab.ike_sas("a") == []  # no SA of any kind is left behind by the failures
    assert ppk_sas(lab, "b") == []
    assert "fault injection: loading a corrupted PPK" in responder.log()


@ONE_MODE
async def test_file_mode_writes_private_secrets_and_brings_the_sa_up(
    lab: StrongSwanLab, sites: Sites, tmp_path: Path
) -> None:
    """Issue 3 item 1, file mode: the responder writes its PPKs (and PSK) into a swanctl.conf
    include with mode 0600 and reloads credentials with swanctl; the SA comes up with a PPK."""
    secrets = tmp_path / "swanctl-b" / "conf.d" / "kme-ppk.conf"
    swanctl_conf = tmp_path / "swanctl-b" / "swanctl.conf"
    swanctl_conf.parent.mkdir(parents=True)
    swanctl_conf.write_text(f"include {secrets}\n")
    responder = sites.adapter(
        "b",
        charon={"mode": "file", "secrets_file": str(secrets), "swanctl_conf": str(swanctl_conf)},
    )
    initiator = sites.adapter("a")
    responder.start()
    initiator.start()
    await wait_for(lambda: both_up(lab), what="a PPK-protected IKE SA with a file-mode responder")
    assert secrets.stat().st_mode & 0o777 == 0o600
    text = secrets.read_text()
    assert text.count("ppk-") == 1
    assert "secret = 0x" in text
    key_id = re.search(r'id = "([0-9a-f-]{36})"', text)
    assert key_id is not None
    assert f"using PPK for PPK_ID '{key_id.group(1)}'" in lab.sites["b"].log()
    # Credentials charon loses (someone else's reload) come back from the file.
    with lab.session("b") as session:
        session.unload_shared({"id": f"ppk-{key_id.group(1)}"})
    await wait_for(
        lambda: f"ppk-{key_id.group(1)}" in lab.shared_ids("b"), what="the file's PPK restored"
    )


@ONE_MODE
async def test_faults_are_retried_until_a_ppk_sa_is_up(
    lab: StrongSwanLab, sites: Sites, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 3 item 1, faults: a peer adapter that is down and an empty KME pool (503) are
    retried with back-off and logged with the reason, and no key is spent while the peer
    cannot take it; once both are fixed the SA comes up. A restarted charon on either side
    gets its connection and exactly one fresh PPK back, and a responder whose charon lost
    its credentials (as `swanctl --load-creds` does) gets them back."""
    caplog.set_level(logging.INFO, logger="kme")
    kme = sites.kme
    initiator = sites.adapter("a")
    responder = sites.adapter("b")
    initiator.start()
    await wait_for(
        lambda: initiator.log().count("peer adapter unreachable") >= 2, what="peer-down retries"
    )
    assert issued_key_ids(caplog) == []  # nothing spent on a peer that is not there
    async with kme.database.session() as session:  # empty the pool: enc_keys answers 503
        from kme.keys import pool

        link = await pool.get_link(session, "KME_TEST", "KME_TEST")
        assert link is not None
        await pool.reserve(
            session,
            link,
            master_sae_id="SAE_A",
            slave_sae_ids=["SAE_C"],
            number=link.stored_blocks,
            size_bits=256,
            ttl_seconds=60,
        )
        await session.commit()
    responder.start()
    await wait_for(lambda: initiator.log().count("KME answered 503") >= 2, what="503 retries")
    assert lab.ike_sas("a") == []
    await kme.fill(20)
    await wait_for(lambda: both_up(lab), what="the SA once the KME and the peer are back")

    for site in ("b", "a"):
        before = len(issued_key_ids(caplog))
        lab.restart(site)
        await wait_for(
            lambda: both_up(lab), seconds=30, what=f"the SA after charon {site} restarted"
        )
        await asyncio.sleep(1.5)  # several check intervals: it must stay up, on one key
        assert both_up(lab)
        assert len(issued_key_ids(caplog)) == before + 1

    with lab.session("b") as session:
        session.unload_shared({"id": f"kme-ike-psk-{CONNECTION}"})
    await wait_for(
        lambda: f"kme-ike-psk-{CONNECTION}" in lab.shared_ids("b"), what="the PSK restored"
    )
    assert "restoring" in responder.log()
    for text in (initiator.log(), responder.log()):
        assert "Traceback" not in text


@ONE_MODE
async def test_a_restarted_initiator_adapter_cleans_up_after_its_earlier_run(
    lab: StrongSwanLab, sites: Sites, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 3 item 1: an initiator adapter restarted while its SA is up brings up a new
    PPK SA, then closes the SA and retires the PPKs its earlier run left, on both daemons."""
    caplog.set_level(logging.INFO, logger="kme")
    responder = sites.adapter("b")
    responder.start()
    await wait_for(lambda: port_open(sites.port), what="the responder's peer channel")
    first = sites.adapter("a")
    first.start()
    await wait_for(lambda: both_up(lab), what="the first SA")
    old_key = issued_key_ids(caplog)[0]
    first.stop()
    second = sites.adapter("a", label="a-again")
    second.start()
    await wait_for(lambda: len(issued_key_ids(caplog)) == 2, what="the second run's key")
    new_key = issued_key_ids(caplog)[1]

    def clean() -> bool:
        return (
            both_up(lab)
            and all(len(lab.ike_sas(site)) == 1 for site in ("a", "b"))
            and all(f"kme-ppk-{old_key}" not in lab.shared_ids(site) for site in ("a", "b"))
        )

    await wait_for(clean, what="one SA per daemon and the old PPK gone")
    for site in ("a", "b"):
        assert f"kme-ppk-{new_key}" in lab.shared_ids(site)
    assert "left by an earlier run" in second.log()


@ONE_MODE
async def test_own_kme_faults_are_logged_and_retried(lab: StrongSwanLab, sites: Sites) -> None:
    """Issue 3 item 1, faults: an adapter whose KME is unreachable, or refuses it (401: its
    SAE is not registered there), logs the reason, retries with back-off, and loads
    nothing; once the KME accepts it again, the PPK SA comes up."""
    responder = sites.adapter("b")  # up and ready, so the KME is the only fault
    responder.start()
    await wait_for(lambda: port_open(sites.port), what="the responder's peer channel")
    unreachable = sites.adapter(
        "a", label="a-unreachable", kme={"url": f"https://127.0.0.1:{free_port()}"}
    )
    unreachable.start()
    await wait_for(
        lambda: unreachable.log().count("KME unreachable") >= 2, what="unreachable retries"
    )
    unreachable.stop()
    assert lab.ike_sas("a") == []

    await sites.kme.unregister("SAE_A")
    refused = sites.adapter("a")
    refused.start()
    await wait_for(lambda: refused.log().count("KME answered 401") >= 2, what="401 retries")
    assert lab.ike_sas("a") == []
    assert not [key for key in lab.shared_ids("a") if key.startswith("kme-ppk-")]
    await sites.kme.register("SAE_A")
    await wait_for(lambda: both_up(lab), what="the SA once the KME accepts the SAE again")


@pytest.mark.parametrize("lab", ["netns"], indirect=True)
async def test_rotation_keeps_the_tunnel_up_make_before_break(
    lab: StrongSwanLab, sites: Sites, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 3 item 1: with a CHILD_SA (userspace ESP), every new PPK-protected IKE SA
    comes up with its own CHILD_SA before the old IKE SA and its CHILD_SA are closed, and
    traffic crosses the tunnel after the rotation."""
    if not lab.supports_child_sas:
        pytest.skip("CHILD_SAs need kernel-libipsec (apt-get install libcharon-extra-plugins)")
    caplog.set_level(logging.INFO, logger="kme")

    def with_child(site: str) -> dict[str, Any]:
        here, there = lab.sites[site], lab.sites["b" if site == "a" else "a"]
        return {
            **conn(lab, site, "b" if site == "a" else "a"),
            "childless": "never",
            "children": {
                "net": {
                    "local_ts": [f"{here.inner}/32"],
                    "remote_ts": [f"{there.inner}/32"],
                    "esp_proposals": ["aes256-sha256"],
                    "start_action": "none",
                }
            },
        }

    responder = sites.adapter("b", connection={"conn": with_child("b")})
    responder.start()
    await wait_for(lambda: port_open(sites.port), what="the responder's peer channel")
    initiator = sites.adapter("a", connection={"conn": with_child("a"), "rotate_seconds": 3})
    initiator.start()

    def one_sa_with_its_child() -> set[str] | None:
        if not both_up(lab) or not all(len(lab.ike_sas(s)) == 1 for s in ("a", "b")):
            return None
        installed = {
            ike for ike, name, state in lab.child_sas("a") if name == "net" and state == "INSTALLED"
        }
        return installed if installed == {ppk_sas(lab, "a")[0]["uniqueid"]} else None

    first = await wait_for(one_sa_with_its_child, what="an IKE SA with its CHILD_SA")
    assert lab.send_through_tunnel(b"before the rotation") == b"before the rotation"
    await wait_for(
        lambda: (now := one_sa_with_its_child()) is not None and now != first,
        what="a rotated IKE SA with its own CHILD_SA",
    )
    assert len(issued_key_ids(caplog)) >= 2
    assert lab.send_through_tunnel(b"after the rotation") == b"after the rotation"
    assert "Traceback" not in initiator.log()
