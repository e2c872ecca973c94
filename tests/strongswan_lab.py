"""Two real strongSwan charon daemons in their own network namespaces, for the IPsec tests.

Recipe: ../shared/spec/strongswan-lab.md. Each charon runs in its own netns (joined by a
veth pair) with a private /run (its pid file is hard-coded), its own strongswan.conf
(STRONGSWAN_CONF) and its own VICI socket, which the host namespace reaches as a file.
IKE traffic never leaves the two namespaces. Everything started here is stopped and
removed by `close()`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHARON = Path("/usr/lib/ipsec/charon")
CHARON_SYSTEMD = Path("/usr/sbin/charon-systemd")  # writes no pid file: two can share /run
OPENSSL_PLUGIN = Path("/usr/lib/ipsec/plugins/libstrongswan-openssl.so")  # x25519
# Userspace ESP (libcharon-extra-plugins): CHILD_SAs on kernels without ESP; netns only,
# since it brings up a TUN device and routes in the daemon's namespace.
LIBIPSEC_PLUGIN = Path("/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so")
PLUGINS = (
    "random nonce aes sha1 sha2 hmac kdf gmp pem pkcs1 x509 pubkey constraints revocation "
    "openssl kernel-netlink socket-default vici"
)
PROPOSAL = "aes256-sha256-x25519"
IKE_PSK = "classical-psk-for-the-kme-lab-0123456789"


def unavailable_reason(mode: str = "netns") -> str | None:
    """Why real strongSwan daemons cannot run here in `mode`, or None if they can.

    netns: each charon in its own network namespace (the primary recipe).
    loopback: two charon-systemd on 127.0.0.1 with their own IKE ports, for machines
    where namespaces are not permitted.
    """
    if os.geteuid() != 0:
        return "needs root (charon binds IKE ports and drives XFRM)"
    if not CHARON.exists() or not OPENSSL_PLUGIN.exists():
        return (
            f"strongSwan is not installed ({CHARON} or its openssl plugin is missing: apt-get "
            "install strongswan-charon strongswan-swanctl libstrongswan-standard-plugins)"
        )
    try:
        import vici  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return "the vici package is missing"
    if mode == "loopback":
        if not CHARON_SYSTEMD.exists():
            return f"{CHARON_SYSTEMD} is missing (apt-get install charon-systemd)"
        return None
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "iproute2 and util-linux (ip, unshare) are needed"
    probe = f"kmeprobe{os.getpid()}"
    made = subprocess.run(
        ["ip", "netns", "add", probe], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        return f"network namespaces are not permitted here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, a bounded wait (charon takes 1 to 2 s), then SIGKILL."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@dataclass
class Site:
    name: str  # "a" or "b"
    netns: str
    address: str
    ike_id: str
    root: Path
    ike_port: int = 500
    inner: str = ""  # netns mode: an address on lo that tunnelled traffic goes to
    process: subprocess.Popen[bytes] | None = None

    @property
    def vici_socket(self) -> Path:
        return self.root / "charon.vici"

    @property
    def log_file(self) -> Path:
        return self.root / "charon.log"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class StrongSwanLab:
    def __init__(self, root: Path, mode: str = "netns") -> None:
        tag = f"{os.getpid() % 100000}"
        self.root = root
        self.mode = mode
        if mode == "netns":
            self.sites = {
                "a": Site(
                    "a",
                    f"kme{tag}a",
                    "10.123.0.1",
                    "site-a.qkd.test",
                    root / "a",
                    inner="10.98.1.1",
                ),
                "b": Site(
                    "b",
                    f"kme{tag}b",
                    "10.123.0.2",
                    "site-b.qkd.test",
                    root / "b",
                    inner="10.98.2.1",
                ),
            }
        else:
            base = 20000 + (os.getpid() % 2000) * 4
            self.sites = {
                "a": Site("a", "", "127.0.0.1", "site-a.qkd.test", root / "a", base),
                "b": Site("b", "", "127.0.0.1", "site-b.qkd.test", root / "b", base + 2),
            }
        self._veth = (f"kv{tag}a", f"kv{tag}b")
        self._up = False

    def up(self) -> None:
        if self.mode == "netns":
            self._namespaces()
        for site in self.sites.values():
            self.start(site.name)

    def _namespaces(self) -> None:
        a, b = self.sites["a"], self.sites["b"]
        _ip("netns", "add", a.netns)
        self._up = True
        _ip("netns", "add", b.netns)
        _ip("link", "add", self._veth[0], "type", "veth", "peer", "name", self._veth[1])
        _ip("link", "set", self._veth[0], "netns", a.netns)
        _ip("link", "set", self._veth[1], "netns", b.netns)
        for site, veth in ((a, self._veth[0]), (b, self._veth[1])):
            _ip("-n", site.netns, "addr", "add", f"{site.address}/24", "dev", veth)
            _ip("-n", site.netns, "link", "set", "lo", "up")
            _ip("-n", site.netns, "link", "set", veth, "up")
            _ip("-n", site.netns, "addr", "add", f"{site.inner}/32", "dev", "lo")

    @property
    def supports_child_sas(self) -> bool:
        """CHILD_SAs need ESP: userspace ESP (kernel-libipsec) in namespaces here."""
        return self.mode == "netns" and LIBIPSEC_PLUGIN.exists()

    def child_sas(self, name: str) -> list[tuple[str, str, str]]:
        """(IKE SA unique id, CHILD_SA name, state) for every CHILD_SA of the daemon."""
        with self.session(name) as session:
            entries = list(session.list_sas())
        return [
            (sa["uniqueid"].decode(), child["name"].decode(), child["state"].decode())
            for entry in entries
            for sa in entry.values()
            for child in sa.get("child-sas", {}).values()
        ]

    def send_through_tunnel(self, payload: bytes, timeout: float = 5.0) -> bytes:
        """One UDP datagram from A's inner address to B's; what B received."""
        a, b = self.sites["a"], self.sites["b"]
        receive = (
            "import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
            f"s.bind(('{b.inner}',9999));s.settimeout({timeout});"
            "sys.stdout.buffer.write(s.recvfrom(2048)[0])"
        )
        receiver = subprocess.Popen(
            ["ip", "netns", "exec", b.netns, sys.executable, "-c", receive], stdout=subprocess.PIPE
        )
        time.sleep(0.3)
        send = (
            "import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
            f"s.bind(('{a.inner}',0));s.sendto({payload!r},('{b.inner}',9999))"
        )
        subprocess.run(["ip", "netns", "exec", a.netns, sys.executable, "-c", send], check=True)
        out, _ = receiver.communicate(timeout=timeout + 5)
        return out

    def conn_ports(self, local: str, remote: str) -> dict[str, str]:
        """The IKE ports a connection names (loopback mode only: both sites share 127.0.0.1)."""
        if self.mode == "netns":
            return {}
        return {
            "local_port": str(self.sites[local].ike_port),
            "remote_port": str(self.sites[remote].ike_port),
        }

    def _write_conf(self, site: Site) -> Path:
        site.root.mkdir(parents=True, exist_ok=True)
        conf = site.root / "strongswan.conf"
        section = "charon" if self.mode == "netns" else "charon-systemd"
        ports = (
            ""
            if self.mode == "netns"
            else f"port = {site.ike_port}\n    port_nat_t = {site.ike_port + 1}\n    routing_table = 0\n"
            "    journal {\n        default = -1\n    }\n    "
        )
        plugins = PLUGINS
        if self.supports_child_sas:
            plugins = plugins.replace("kernel-netlink", "kernel-libipsec kernel-netlink")
        conf.write_text(
            f"""{section} {{
    load = {plugins}
    {ports}install_routes = no
    plugins {{
        vici {{
            socket = unix://{site.vici_socket}
        }}
    }}
    filelog {{
        main {{
            path = {site.log_file}
            time_format = %H:%M:%S
            ike_name = yes
            append = yes
            flush_line = yes
            default = 1
            ike = 2
            cfg = 2
        }}
    }}
    syslog {{
        daemon {{
            default = -1
        }}
        auth {{
            default = -1
        }}
    }}
}}
"""
        )
        return conf

    def start(self, name: str) -> None:
        site = self.sites[name]
        conf = self._write_conf(site)
        site.vici_socket.unlink(missing_ok=True)
        if self.mode == "netns":
            script = f"mount -t tmpfs tmpfs /run && exec env STRONGSWAN_CONF={conf} {CHARON}"
            command = [
                "ip",
                "netns",
                "exec",
                site.netns,
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ]
            environment = None
        else:
            command = [str(CHARON_SYSTEMD)]
            environment = {**os.environ, "STRONGSWAN_CONF": str(conf)}
        with (site.root / "charon.stderr").open("ab") as stderr:
            site.process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=stderr, env=environment
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if site.vici_socket.exists():
                try:
                    with socket.socket(socket.AF_UNIX) as probe:
                        probe.connect(str(site.vici_socket))
                    return
                except OSError:
                    pass
            if site.process.poll() is not None:
                raise RuntimeError(
                    f"charon {name} exited: {(site.root / 'charon.stderr').read_text()}"
                )
            time.sleep(0.05)
        raise RuntimeError(f"charon {name} did not open its VICI socket")

    def stop(self, name: str) -> None:
        site = self.sites[name]
        process, site.process = site.process, None
        stop_process(process)

    def restart(self, name: str) -> None:
        self.stop(name)
        self.start(name)

    def close(self) -> None:
        for name in self.sites:
            self.stop(name)
        if self._up:
            for site in self.sites.values():
                subprocess.run(["ip", "netns", "del", site.netns], capture_output=True, check=False)
            self._up = False

    # -- looking at a daemon ---------------------------------------------------------------

    @contextmanager
    def session(self, name: str) -> Iterator[Any]:
        import vici

        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.sites[name].vici_socket))
            yield vici.Session(sock)

    def ike_sas(self, name: str) -> list[dict[str, str]]:
        """Every IKE SA of the daemon: name, uniqueid, state, ppk."""
        found = []
        with self.session(name) as session:
            entries = list(session.list_sas())
        for entry in entries:
            for sa_name, sa in entry.items():
                found.append(
                    {
                        "name": sa_name.decode() if isinstance(sa_name, bytes) else sa_name,
                        "uniqueid": sa["uniqueid"].decode(),
                        "state": sa["state"].decode(),
                        "ppk": sa.get("ppk", b"no").decode(),
                    }
                )
        return found

    def shared_ids(self, name: str) -> list[str]:
        with self.session(name) as session:
            return [key.decode() for key in session.get_shared().get("keys", [])]

    def reset(self) -> None:
        """Close every SA and unload every connection and shared key (between tests)."""
        for name in self.sites:
            with self.session(name) as session:
                for entry in list(session.list_sas()):
                    for sa in entry.values():
                        for _ in session.terminate(
                            {"ike-id": sa["uniqueid"].decode(), "force": "yes", "timeout": "-1"}
                        ):
                            pass
                for conn in session.get_conns().get("conns", []):
                    session.unload_conn({"name": conn})
                for key in session.get_shared().get("keys", []):
                    session.unload_shared({"id": key})
