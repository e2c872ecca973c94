"""charon, driven over VICI (the `vici` package, strongSwan's own Python binding).

Every call runs in a worker thread (the binding is blocking) under one lock, because a
VICI session carries one request at a time. A broken socket (charon restarted) is
reopened on the next call.

PPKs reach charon either over VICI `load-shared` (nothing on disk) or, in file mode, as
a swanctl.conf include written with mode 0600 and loaded by `swanctl --load-creds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import vici  # type: ignore[import-untyped]

log = logging.getLogger("kme.ipsec.charon")

T = TypeVar("T")
PSK_ID = "kme-ike-psk-{}"
PPK_ID = "kme-ppk-{}"


class CharonError(Exception):
    """charon refused or could not be reached; the text says which, without secrets."""


@dataclass(frozen=True)
class IKESA:
    name: str
    unique_id: str
    spi: str  # the initiator's SPI: unique ids restart at 1 when charon restarts
    state: str
    ppk: bool


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Charon:
    def __init__(self, vici_socket: Path) -> None:
        self.path = vici_socket
        self._session: Any = None
        self._lock = threading.Lock()

    async def _run(self, work: Callable[[Any], T]) -> T:
        def call() -> T:
            with self._lock:
                try:
                    if self._session is None:
                        sock = socket.socket(socket.AF_UNIX)
                        sock.settimeout(30.0)
                        sock.connect(str(self.path))
                        self._session = vici.Session(sock)
                    return work(self._session)
                except (OSError, vici.exception.SessionException) as exc:
                    self._session = None
                    raise CharonError(f"VICI at {self.path} unreachable: {exc}") from None
                except vici.exception.CommandException as exc:
                    raise CharonError(str(exc)) from None

        return await asyncio.to_thread(call)

    async def close(self) -> None:
        def drop(_: Any) -> None:
            self._session = None

        with contextlib.suppress(CharonError):
            await self._run(drop)

    async def load_psk(self, connection: str, secret: str, owners: list[str]) -> None:
        message = {
            "id": PSK_ID.format(connection),
            "type": "IKE",
            "data": secret.encode(),
            "owners": owners,
        }
        await self._run(lambda s: s.load_shared(message))

    async def load_ppk(self, key_id: str, material: bytes) -> None:
        message = {"id": PPK_ID.format(key_id), "type": "PPK", "data": material, "owners": [key_id]}
        await self._run(lambda s: s.load_shared(message))

    async def unload_ppk(self, key_id: str) -> None:
        await self._run(lambda s: s.unload_shared({"id": PPK_ID.format(key_id)}))

    async def load_conn(self, name: str, conn: dict[str, Any]) -> None:
        await self._run(lambda s: s.load_conn({name: conn}))

    async def conn_loaded(self, name: str) -> bool:
        names = await self._run(lambda s: s.get_conns())
        return name in [_text(conn) for conn in names.get("conns", [])]

    async def initiate(self, name: str, timeout_ms: int, child: str | None = None) -> list[str]:
        """Bring up `child` of `name`, or the IKE SA alone. A conn just reloaded with a new
        ppk_id is a new config to charon, so this makes a new IKE SA, never reuses one."""

        def run(session: Any) -> list[str]:
            lines: list[str] = []
            request = {"ike": name, "timeout": str(timeout_ms), "loglevel": "1"}
            if child is not None:
                request["child"] = child
            try:
                for event in session.initiate(request):
                    lines.append(_text(event.get("msg", b"")))
            except vici.exception.CommandException as exc:
                reasons = [line for line in lines if _is_reason(line)]
                raise CharonError(f"{exc}" + (f": {reasons[-1]}" if reasons else "")) from None
            return lines

        return await self._run(run)

    async def ike_sas(self, name: str | None = None) -> list[IKESA]:
        def run(session: Any) -> list[IKESA]:
            request = {"ike": name} if name else {}
            found: list[IKESA] = []
            for entry in list(session.list_sas(request)):
                for sa_name, sa in entry.items():
                    found.append(
                        IKESA(
                            name=_text(sa_name),
                            unique_id=_text(sa.get("uniqueid", b"")),
                            spi=_text(sa.get("initiator-spi", b"")),
                            state=_text(sa.get("state", b"")),
                            ppk=_text(sa.get("ppk", b"no")) == "yes",
                        )
                    )
            return found

        return await self._run(run)

    async def shared_ids(self) -> list[str]:
        """The ids of every shared secret charon holds (PSKs and PPKs)."""
        found = await self._run(lambda s: s.get_shared())
        return [_text(key) for key in found.get("keys", [])]

    async def terminate(self, unique_id: str) -> None:
        def run(session: Any) -> None:
            request = {"ike-id": unique_id, "force": "yes", "timeout": "-1"}
            for _ in session.terminate(request):
                pass

        await self._run(run)


def _is_reason(line: str) -> bool:
    lowered = line.lower()
    return any(
        word in lowered
        for word in (
            "failed",
            "authentication_failed",
            "no ppk",
            "ppk required",
            "no_proposal",
            "mismatch",
        )
    )


class SecretsFile:
    """File mode: the PPKs (and IKE PSKs) as a swanctl.conf include, mode 0600."""

    def __init__(self, path: Path, swanctl_conf: Path, swanctl: str, vici_socket: Path) -> None:
        self.path = path
        self.swanctl_conf = swanctl_conf
        self.swanctl = swanctl
        self.vici_socket = vici_socket
        self.ppks: dict[str, bytes] = {}
        self.psks: dict[str, tuple[str, list[str]]] = {}
        self._lock = asyncio.Lock()

    def expected_ids(self) -> set[str]:
        """The ids charon reports (get-shared) for what this file holds."""
        return {f"ike-kme-{_section(name)}" for name in self.psks} | {
            f"ppk-{_section(key_id)}" for key_id in self.ppks
        }

    def render(self) -> str:
        lines = ["# written by kme ipsec strongswan (file mode): PPKs from the KME", "secrets {"]
        for connection, (secret, owners) in sorted(self.psks.items()):
            lines.append(f"    ike-kme-{_section(connection)} {{")
            for i, owner in enumerate(owners, 1):
                lines.append(f"        id-{i} = {_quoted(owner)}")
            lines.append(f"        secret = 0x{secret.encode().hex()}")
            lines.append("    }")
        for key_id, material in self.ppks.items():
            lines.append(f"    ppk-{_section(key_id)} {{")
            lines.append(f"        id = {_quoted(key_id)}")
            lines.append(f"        secret = 0x{material.hex()}")
            lines.append("    }")
        lines.append("}")
        return "\n".join(lines) + "\n"

    async def sync(self) -> None:
        """Write the file and have charon load the credentials of `swanctl_conf`, which
        must be the gateway's main swanctl.conf with an `include` of this file: swanctl
        unloads every shared secret its configuration does not name."""
        async with self._lock:  # one sync at a time, each writing what is current
            await asyncio.to_thread(self._write_and_load, self.render())

    def _write_and_load(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # mkstemp: a new file, mode 0600 from the start, never a stale or linked one.
        fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        result = subprocess.run(  # noqa: S603  (our own arguments, no shell)
            [
                self.swanctl,
                "--load-creds",
                "--noprompt",
                "--file",
                str(self.swanctl_conf),
                "--uri",
                f"unix://{self.vici_socket}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
            raise CharonError(f"swanctl --load-creds failed: {' '.join(tail)}")


def _section(name: str) -> str:
    """A swanctl section name for `name`: readable, and distinct for distinct names."""
    readable = "".join(char if char.isalnum() or char in "-_" else "_" for char in name)
    if readable == name:
        return name
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
