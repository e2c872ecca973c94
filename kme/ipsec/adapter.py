"""The strongSwan PPK adapter: KME keys into charon as RFC 8784 PPKs, rotated.

Initiator, per connection: enc_keys at its own KME (as master, for the peer's SAE) ->
key_ID to the peer adapter, wait for "loaded" -> load the PPK -> load the connection
with ppk_id = key_ID, ppk_required = yes -> initiate a new IKE SA -> only once it is
ESTABLISHED with a PPK, close the previous SA and retire its PPK on both sides
(make-before-break). The same cycle runs again every `rotate_seconds`, and whenever the
SA disappears (charon restarted, peer closed it).

Responder: keeps its connection (no ppk_id, ppk_required = yes) loaded in charon; for
each key_ID its peer sends, dec_keys at its own KME (as slave, naming the peer's SAE as
master) and load the PPK before confirming.

Every failure is logged with its reason and retried with exponential back-off; the last
good SA stays up meanwhile. Key material lives only in memory (and, in file mode, in the
0600 secrets file charon reads); it is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from kme.ipsec.charon import IKESA, PPK_ID, PSK_ID, Charon, CharonError, SecretsFile
from kme.ipsec.config import AdapterSettings, ConnectionSettings
from kme.ipsec.etsi import ETSIClient, KMEClientError, QKDKey, mutual_tls_context
from kme.ipsec.peer import PeerClient, PeerError, responder_app

log = logging.getLogger("kme.ipsec")

ADAPTER_ERRORS = (KMEClientError, PeerError, CharonError)
RESPONDER_KEEPS = 4


@dataclass
class Established:
    key_id: str
    unique_id: str
    spi: str
    at: float = field(default_factory=time.monotonic)


class PPKStore:
    """Where PPKs go: charon over VICI, or the secrets file (file mode)."""

    def __init__(self, settings: AdapterSettings, charon: Charon) -> None:
        self.charon = charon
        self.file = (
            SecretsFile(
                settings.charon.secrets_file,
                settings.charon.swanctl_conf,
                settings.charon.swanctl,
                settings.charon.vici,
            )
            if settings.charon.mode == "file"
            and settings.charon.secrets_file
            and settings.charon.swanctl_conf
            else None
        )
        # The PPKs charon should hold, so that a restarted charon gets them back.
        self.held: dict[str, bytes] = {}
        self.psks: dict[str, tuple[str, list[str]]] = {}

    async def add_psk(self, connection: ConnectionSettings) -> None:
        if connection.psk is None:
            return
        self.psks[connection.name] = (
            connection.psk.get_secret_value(),
            list(connection.psk_owners),
        )
        if self.file:
            self.file.psks[connection.name] = self.psks[connection.name]
            await self.file.sync()
        else:
            await self.charon.load_psk(connection.name, *self.psks[connection.name])

    async def add(self, key: QKDKey) -> None:
        self.held[key.key_id] = key.material
        if self.file:
            self.file.ppks[key.key_id] = key.material
            await self.file.sync()
        else:
            await self.charon.load_ppk(key.key_id, key.material)

    async def remove(self, key_ids: list[str]) -> None:
        for key_id in key_ids:
            self.held.pop(key_id, None)
        if self.file:
            for key_id in key_ids:
                self.file.ppks.pop(key_id, None)
            await self.file.sync()
            return
        for key_id in key_ids:
            with contextlib.suppress(CharonError):
                await self.charon.unload_ppk(key_id)

    async def restore(self) -> None:
        """Give a restarted charon back its PSKs and PPKs."""
        if self.file:
            await self.file.sync()
            return
        for name, (secret, owners) in self.psks.items():
            await self.charon.load_psk(name, secret, owners)
        for key_id, material in self.held.items():
            await self.charon.load_ppk(key_id, material)


class Adapter:
    def __init__(self, settings: AdapterSettings) -> None:
        self.settings = settings
        kme = settings.kme
        self.kme = ETSIClient(
            str(kme.url),
            mutual_tls_context(kme.ca_file, kme.certfile, kme.keyfile),
            timeout=kme.timeout,
        )
        self.charon = Charon(settings.charon.vici)
        self.ppks = PPKStore(settings, self.charon)
        self.established: dict[str, Established] = {}
        self.responder_keys: dict[str, list[str]] = {}  # per connection, oldest first

    # -- shared ------------------------------------------------------------------------

    def _conn(self, connection: ConnectionSettings, ppk_id: str | None) -> dict[str, Any]:
        # Unless the connection says otherwise: dead peer detection, so a peer that died
        # without a DELETE (a killed charon) ends the SA and the adapter replaces it, and no
        # IKE rekeying by charon: the adapter's rotation replaces the IKE SA with a fresh
        # PPK anyway, and a rekeyed SA would look like a lost one.
        conn: dict[str, Any] = {
            "dpd_delay": "10s",
            "rekey_time": "0",
            **connection.conn,
            "ppk_required": "yes",
        }
        if ppk_id is not None:
            conn["ppk_id"] = ppk_id
        else:
            conn.pop("ppk_id", None)
        return conn

    def _material(self, key: QKDKey) -> QKDKey:
        if self.settings.faults.corrupt_ppk:
            log.warning("fault injection: loading a corrupted PPK for key_ID %s", key.key_id)
            return QKDKey(key.key_id, bytes(b ^ 0x5A for b in key.material))
        return key

    async def _backoff(self, attempt: int) -> None:
        await asyncio.sleep(
            backoff_delay(attempt, self.settings.retry_initial, self.settings.retry_max)
        )

    async def aclose(self) -> None:
        await self.kme.aclose()
        await self.charon.close()

    # -- responder ---------------------------------------------------------------------

    async def prepare_responder(self) -> None:
        for connection in self.settings.connections:
            await self.ppks.add_psk(connection)
            await self.charon.load_conn(connection.name, self._conn(connection, None))
            log.info(
                "connection %s loaded as responder (any PPK it holds, PPK required)",
                connection.name,
            )

    async def take_key(self, connection_name: str, key_id: str) -> None:
        """Called by the peer channel: fetch the key from our KME and load it."""
        names = {c.name for c in self.settings.connections}
        if connection_name not in names:
            raise PeerError(f"no connection {connection_name!r} here", status=404)
        try:
            (key,) = await self.kme.dec_keys(self.settings.peer.sae_id, [key_id])
            await self.ppks.add(self._material(key))
        except KMEClientError as exc:
            log.error(
                "key_ID %s for %s: own KME refused dec_keys: %s",
                key_id,
                connection_name,
                exc.reason,
            )
            raise PeerError(f"responder's KME refused the key: {exc.reason}") from None
        except CharonError as exc:
            log.error("key_ID %s for %s: charon refused the PPK: %s", key_id, connection_name, exc)
            raise PeerError(f"responder's charon refused the PPK: {exc}", status=503) from None
        log.info("key_ID %s for %s: PPK loaded", key_id, connection_name)
        # An initiator that never retires (it died, a retire was lost) must not leave PPKs
        # here for good: keep the newest few per connection (make-before-break needs two).
        recent = self.responder_keys.setdefault(connection_name, [])
        recent.append(key_id)
        if len(recent) > RESPONDER_KEEPS:
            stale, recent[:] = recent[:-RESPONDER_KEEPS], recent[-RESPONDER_KEEPS:]
            await self.ppks.remove(stale)
            log.info("%s: unloaded PPKs %s that were never retired", connection_name, stale)

    async def ready(self, connection_name: str) -> None:
        """Called by the peer channel before the peer spends a key: our charon has the
        connection and the credentials (repaired now if it lost them)."""
        if connection_name not in {c.name for c in self.settings.connections}:
            raise PeerError(f"no connection {connection_name!r} here", status=404)
        try:
            await self._repair_responder()
        except CharonError as exc:
            raise PeerError(f"responder's charon is not ready: {exc}", status=503) from None

    async def retire_keys(self, connection_name: str, key_ids: list[str]) -> None:
        recent = self.responder_keys.get(connection_name, [])
        recent[:] = [key_id for key_id in recent if key_id not in key_ids]
        await self.ppks.remove(key_ids)
        log.info("retired PPKs %s of %s", key_ids, connection_name)

    async def watch_responder(self) -> None:
        """Reload connections and credentials into a charon that lost them (a restart, or
        `swanctl --load-creds`, which drops what was loaded over VICI)."""
        attempt = 0
        while True:
            try:
                await self._repair_responder()
                attempt = 0
                await asyncio.sleep(self.settings.check_seconds)
            except CharonError as exc:
                log.warning("charon check failed: %s; retrying", exc)
                await self._backoff(attempt)
                attempt += 1

    async def _repair_responder(self) -> None:
        lost = [
            c.name for c in self.settings.connections if not await self.charon.conn_loaded(c.name)
        ]
        if self.ppks.file is None:
            expected = {PSK_ID.format(name) for name in self.ppks.psks} | {
                PPK_ID.format(key_id) for key_id in self.ppks.held
            }
        else:
            expected = self.ppks.file.expected_ids()
        missing = expected - set(await self.charon.shared_ids())
        if not lost and not missing:
            return
        log.warning(
            "charon lost %s (restarted, or credentials reloaded): restoring",
            ", ".join([*(f"connection {n}" for n in lost), *sorted(missing)]),
        )
        await self.ppks.restore()
        for connection in self.settings.connections:
            if connection.name in lost:
                await self.charon.load_conn(connection.name, self._conn(connection, None))

    # -- initiator ---------------------------------------------------------------------

    async def establish(self, peer: PeerClient, connection: ConnectionSettings) -> Established:
        """One make-before-break step: a new PPK-protected IKE SA for `connection`."""
        name = connection.name
        started = time.monotonic()
        # The SAs there before this attempt; read before a key is spent.
        before: set[str] = {sa.unique_id for sa in await self.charon.ike_sas(name)}
        (key,) = await self.kme.enc_keys(self.settings.peer.sae_id, size=self.settings.kme.key_size)
        log.info("%s: key_ID %s from the KME; handing it to the peer adapter", name, key.key_id)
        try:
            await peer.deliver(name, key.key_id)
            await self.ppks.add(self._material(key))
            await self.charon.load_conn(name, self._conn(connection, key.key_id))
            children: list[str | None] = [*_children(connection)] or [None]
            # The first child brings up the new IKE SA with it, so traffic has its tunnel
            # before the old SA (and its children) go; the others join the new SA.
            for child in children:
                await self.charon.initiate(name, connection.initiate_timeout_ms, child)
            new = [
                sa
                for sa in await self.charon.ike_sas(name)
                if sa.unique_id not in before and sa.state == "ESTABLISHED"
            ]
            if not new:
                raise CharonError(f"no new ESTABLISHED IKE SA of {name} after initiate")
            if not new[0].ppk:
                await self.charon.terminate(new[0].unique_id)
                raise CharonError(f"IKE SA of {name} came up without a PPK; closed it")
        except Exception:
            await self._discard(peer, name, key.key_id)
            # An SA the failed attempt brought up (a child failed, initiate timed out
            # while the exchange went on) must not outlive its retired PPK.
            with contextlib.suppress(CharonError):
                for sa in await self.charon.ike_sas(name):
                    if sa.unique_id not in before:
                        await self.charon.terminate(sa.unique_id)
            raise
        log.info(
            "%s: IKE SA %s ESTABLISHED with PPK_ID %s in %.0f ms (key fetch to SA up)",
            name,
            new[0].unique_id,
            key.key_id,
            (time.monotonic() - started) * 1000,
        )
        return Established(key.key_id, new[0].unique_id, new[0].spi)

    async def _discard(self, peer: PeerClient, name: str, key_id: str) -> None:
        await self.ppks.remove([key_id])
        with contextlib.suppress(PeerError):
            await peer.retire(name, [key_id])

    async def _find(self, name: str, established: Established) -> IKESA | None:
        """The SA `established` names, if charon still has it up (same id *and* SPI)."""
        for sa in await self.charon.ike_sas(name):
            if (sa.unique_id, sa.spi) == (established.unique_id, established.spi):
                return sa if sa.state == "ESTABLISHED" else None
        return None

    async def run_connection(self, peer: PeerClient, connection: ConnectionSettings) -> None:
        name = connection.name
        attempt = 0
        while True:
            current = self.established.get(name)
            try:
                up = current is not None and await self._find(name, current) is not None
                if current is not None and up:
                    due = current.at + connection.rotate_seconds - time.monotonic()
                    if due > 0:
                        attempt = 0
                        await asyncio.sleep(min(due, self.settings.check_seconds))
                        continue
                elif current is not None:
                    log.warning(
                        "%s: IKE SA %s is gone (charon restarted, or the peer closed it); "
                        "re-establishing",
                        name,
                        current.unique_id,
                    )
                    await self.ppks.restore()
                # Nothing is spent while the peer adapter cannot take a key.
                await peer.health(name)
                # Every attempt: a charon that lost its credentials gets the PSK back.
                await self.ppks.add_psk(connection)
                fresh = await self.establish(peer, connection)
                self.established[name] = fresh
                attempt = 0
            except ADAPTER_ERRORS as exc:
                reason = getattr(exc, "reason", None) or str(exc)
                log.error("%s: no new IKE SA (attempt %d): %s", name, attempt + 1, reason)
                await self._backoff(attempt)
                attempt += 1
                continue
            except Exception as exc:  # keep the gateway's keys flowing whatever broke
                log.error(
                    "%s: no new IKE SA (attempt %d): unexpected %s: %s",
                    name,
                    attempt + 1,
                    type(exc).__name__,
                    exc,
                )
                await self._backoff(attempt)
                attempt += 1
                continue
            try:
                await self._after_success(peer, name, fresh, current, still_up=up)
            except Exception as exc:  # the new SA is up; the next check cleans up the rest
                log.warning("%s: cleaning up after the new SA failed: %s", name, exc)

    async def _after_success(
        self,
        peer: PeerClient,
        name: str,
        fresh: Established,
        current: Established | None,
        *,
        still_up: bool,
    ) -> None:
        if current is None:
            await self._sweep_leftovers(peer, name, fresh)
            return
        await self._close(peer, name, current, still_up=still_up)
        # Anything else of this connection (a rekeyed or orphaned SA) goes too.
        for sa in await self.charon.ike_sas(name):
            if (sa.unique_id, sa.spi) != (fresh.unique_id, fresh.spi):
                with contextlib.suppress(CharonError):
                    await self.charon.terminate(sa.unique_id)
                log.info("%s: closed stray IKE SA %s", name, sa.unique_id)

    async def _close(
        self, peer: PeerClient, name: str, old: Established, *, still_up: bool
    ) -> None:
        """After a new SA is up: close the old one (if charon still has *that* SA) and
        retire its PPK on both sides."""
        if still_up and await self._find(name, old) is not None:
            with contextlib.suppress(CharonError):
                await self.charon.terminate(old.unique_id)
            closed = f"IKE SA {old.unique_id} closed"
        else:
            closed = f"IKE SA {old.unique_id} was gone already"
        await self._retire(peer, name, [old.key_id])
        log.info("%s: rotated: %s, PPK %s retired", name, closed, old.key_id)

    async def _retire(self, peer: PeerClient, name: str, key_ids: list[str]) -> None:
        await self.ppks.remove(key_ids)
        try:
            await peer.retire(name, key_ids)
        except PeerError as exc:
            log.warning("%s: peer could not retire PPKs %s: %s", name, key_ids, exc.reason)

    async def _sweep_leftovers(self, peer: PeerClient, name: str, fresh: Established) -> None:
        """The first SA of this adapter process is up: close what an earlier run left
        (its SAs of this connection, its PPKs here and at the peer)."""
        for sa in await self.charon.ike_sas(name):
            if (sa.unique_id, sa.spi) != (fresh.unique_id, fresh.spi):
                with contextlib.suppress(CharonError):
                    await self.charon.terminate(sa.unique_id)
                log.info("%s: closed IKE SA %s left by an earlier run", name, sa.unique_id)
        if self.ppks.file is not None:
            return  # file mode: charon holds exactly the file this process writes
        prefix = PPK_ID.format("")
        leftovers = [
            shared.removeprefix(prefix)
            for shared in await self.charon.shared_ids()
            if shared.startswith(prefix) and shared.removeprefix(prefix) not in self.ppks.held
        ]
        if leftovers:
            await self._retire(peer, name, leftovers)
            log.info("%s: retired PPKs %s left by an earlier run", name, leftovers)


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Exponential back-off; the exponent is capped, as 2.0**1024 overflows (after about
    8.5 hours of failures at the default 30 s cap)."""
    return min(maximum, initial * 2.0 ** min(attempt, 60))


def _children(connection: ConnectionSettings) -> list[str]:
    """The CHILD_SAs to start with each new IKE SA (none for childless = force)."""
    if connection.conn.get("childless") == "force":
        return []
    return list(connection.conn.get("children") or {})


async def run(settings: AdapterSettings) -> None:
    """Run the adapter until cancelled."""
    from kme.server import mutual_tls_server, mutual_tls_server_context

    adapter = Adapter(settings)
    tasks: list[asyncio.Task[Any]] = []
    server = None
    try:
        if settings.role == "responder":
            await _until_ok(
                adapter, adapter.prepare_responder, "loading the responder's connection"
            )
            listen = settings.listen
            context = mutual_tls_server_context(
                listen.certfile or settings.kme.certfile,
                listen.keyfile or settings.kme.keyfile,
                settings.peer.ca_file,
                fields=("listen.certfile", "listen.keyfile", "peer.ca_file"),
            )
            app = responder_app(
                settings.peer.identity, adapter.take_key, adapter.retire_keys, adapter.ready
            )
            server = mutual_tls_server(
                app, context, host=listen.host, port=listen.port, graceful_seconds=2
            )
            tasks.append(asyncio.create_task(server.serve(), name="peer-channel"))
            tasks.append(asyncio.create_task(adapter.watch_responder(), name="charon-watch"))
        else:
            if settings.peer.url is None:  # load_adapter_settings refuses this already
                raise ValueError("an initiator needs peer.url")
            peer_context = mutual_tls_context(
                settings.peer.ca_file, settings.kme.certfile, settings.kme.keyfile
            )
            peer = PeerClient(
                str(settings.peer.url), peer_context, settings.peer.identity, settings.peer.timeout
            )
            for connection in settings.connections:
                tasks.append(asyncio.create_task(adapter.run_connection(peer, connection)))
        await asyncio.gather(*tasks)
    finally:
        if server is not None:
            server.should_exit = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await adapter.aclose()


async def _until_ok(adapter: Adapter, step: Any, what: str) -> None:
    attempt = 0
    while True:
        try:
            await step()
            return
        except ADAPTER_ERRORS as exc:
            log.error("%s failed (attempt %d): %s", what, attempt + 1, exc)
            await adapter._backoff(attempt)
            attempt += 1
