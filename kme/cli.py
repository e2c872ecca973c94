"""The `kme` command: serve, init, sae, pool, db, openapi.

Errors a user can fix (configuration, files, arguments) end the command with one clear
sentence on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from kme import lab, pki, saes
from kme.config import Settings, load_settings
from kme.db import Database
from kme.errors import ConfigError
from kme.keys import pool, supply

DEFAULT_LAB = Path("kme-lab")


class UsageError(Exception):
    """A problem the user can fix; printed as one sentence."""


def _default_config() -> Path:
    return Path(os.environ.get("KME_CONFIG", DEFAULT_LAB / "kme.toml"))


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request is noise


# -- serve ---------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> None:
    from kme.app import create_app
    from kme.server import build_server, listen

    if args.config is None:
        args.config = _default_config()
        if not args.config.exists() and args.config == DEFAULT_LAB / "kme.toml":
            print(
                f"kme: no configuration found; creating a lab in ./{DEFAULT_LAB}/", file=sys.stderr
            )
            lab.init_lab(DEFAULT_LAB, sae_ids=list(lab.DEFAULT_SAES))
    settings = _settings(args)
    _setup_logging(settings.log_level)
    host = args.host or settings.server.host
    port = settings.server.port if args.port is None else args.port
    try:
        server = build_server(create_app(settings), settings.server, host=host, port=port)
        asyncio.run(lab.prepare_database(settings))
        sock = listen(host, port)
    except ConfigError as exc:
        raise ConfigError(f"{args.config}: {exc}") from None
    _print_quickstart(settings, args.config, host, sock.getsockname()[1])
    server.run(sockets=[sock])


def _print_quickstart(settings: Settings, config: Path, host: str, port: int) -> None:
    certs = settings.server.ca_file.parent
    cwd = Path.cwd()

    def rel(path: Path) -> str:
        try:
            return str(path.resolve().relative_to(cwd))
        except ValueError:
            return str(path)

    local = [s for s in _registered_sae_ids(settings) if lab.sae_paths(certs, s).cert.is_file()]
    if set(lab.DEFAULT_SAES) <= set(local):
        local = list(lab.DEFAULT_SAES)
    shown = "localhost" if host in ("0.0.0.0", "::", "127.0.0.1") else host  # noqa: S104
    base = f"https://{shown}:{port}/api/v1/keys"
    print(f"kme {settings.kme_id}: serving {base} (config {rel(config)})")
    if len(local) < 2:
        return
    master, slave = lab.sae_paths(certs, local[0]), lab.sae_paths(certs, local[1])

    def curl(sae: lab.LabSAE, *rest: str) -> str:
        parts = [
            "curl",
            "--cacert",
            rel(settings.server.ca_file),
            "--cert",
            rel(sae.cert),
            "--key",
            rel(sae.key),
            *rest,
        ]
        return " ".join(shlex.quote(part) for part in parts)

    def quoted(sae_id: str) -> str:
        return quote(sae_id, safe="")

    print("\nTry it (the master SAE asks; the slave SAE takes the same key with its key_ID):")
    print(f"  # status, as {master.sae_id} for {slave.sae_id}")
    print("  " + curl(master, f"{base}/{quoted(slave.sae_id)}/status"))
    print(f"  # enc_keys: two 256-bit keys for {slave.sae_id}")
    print(
        "  "
        + curl(
            master,
            "-H",
            "Content-Type: application/json",
            "-d",
            '{"number": 2, "size": 256}',
            f"{base}/{quoted(slave.sae_id)}/enc_keys",
        )
    )
    print(f"  # dec_keys, as {slave.sae_id}: put a key_ID from enc_keys in KEY_ID")
    print("  " + curl(slave, f"{base}/{quoted(master.sae_id)}/dec_keys?key_ID=") + '"$KEY_ID"')
    print(flush=True)


# -- init ----------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> None:
    sae_ids = args.sae or list(lab.DEFAULT_SAES)
    try:
        settings = lab.init_lab(
            args.directory,
            sae_ids=sae_ids,
            kme_id=args.kme_id,
            sans=args.san,
            fill=args.fill,
            force=args.force,
        )
    except (FileExistsError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    print(f"created lab {args.directory} for {settings.kme_id} with SAEs {', '.join(sae_ids)}")
    print(f"  serve it with: kme serve --config {args.directory / 'kme.toml'}")


# -- sae -----------------------------------------------------------------------------------


def _run_db(settings: Settings, work: Callable[[Database], Any]) -> Any:
    async def run() -> Any:
        database = Database(settings.database_url, pool_size=1)
        try:
            return await work(database)
        finally:
            await database.dispose()

    return asyncio.run(run())


def _registered_sae_ids(settings: Settings) -> list[str]:
    async def work(database: Database) -> list[str]:
        async with database.session() as session:
            return [sae.sae_id for sae in await saes.list_all(session)]

    ids: list[str] = _run_db(settings, work)
    return ids


def cmd_sae_add(args: argparse.Namespace) -> None:
    settings = _settings(args)
    fingerprint = args.fingerprint
    if args.cert:
        fingerprint = pki.file_sha256(args.cert)
    if not args.no_cert and not args.cert:
        try:
            lab.check_lab_sae_id(args.sae_id)
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    async def work(database: Database) -> None:
        async with database.session() as session:
            await saes.add(
                session,
                args.sae_id,
                args.kme_id or settings.kme_id,
                cert_sha256=fingerprint,
                size_unit=args.size_unit,
            )
            await session.commit()

    try:
        _run_db(settings, work)
    except IntegrityError:
        raise UsageError(
            f"SAE {args.sae_id!r} (or its fingerprint) is registered already"
        ) from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"registered SAE {args.sae_id}")
    if not args.no_cert and not args.cert:
        issued = lab.issue_sae_certificate(args.config.parent, settings, args.sae_id)
        if issued:
            print(f"  client certificate {issued.cert}\n  private key        {issued.key}")


def cmd_sae_list(args: argparse.Namespace) -> None:
    settings = _settings(args)

    async def work(database: Database) -> list[dict[str, Any]]:
        async with database.session() as session:
            return [
                {
                    "sae_id": s.sae_id,
                    "kme_id": s.kme_id,
                    "cert_sha256": s.cert_sha256,
                    "size_unit": s.size_unit,
                }
                for s in await saes.list_all(session)
            ]

    rows = _run_db(settings, work)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        pinned = f" pinned sha256 {row['cert_sha256']}" if row["cert_sha256"] else ""
        unit = " (size in bytes)" if row["size_unit"] == "bytes" else ""
        print(f"{row['sae_id']}\tKME {row['kme_id']}{unit}{pinned}")


def cmd_sae_remove(args: argparse.Namespace) -> None:
    settings = _settings(args)

    async def work(database: Database) -> bool:
        async with database.session() as session:
            removed = await saes.remove(session, args.sae_id)
            if removed:
                # Keys waiting for (or made by) it must not reach a later holder of the ID.
                await pool.forget_sae(session, args.sae_id)
            await session.commit()
            return removed

    if not _run_db(settings, work):
        raise UsageError(f"no SAE {args.sae_id!r} is registered")
    print(f"removed SAE {args.sae_id}")


# -- pool ----------------------------------------------------------------------------------


def cmd_pool_fill(args: argparse.Namespace) -> None:
    settings = _settings(args)
    if args.count < 1:
        raise UsageError("the number of keys to add must be at least 1")

    async def work(database: Database) -> int:
        link_id = await lab.prepare_database(settings)
        return await supply.add_keys(database, settings, link_id, args.count)

    added = _run_db(settings, work)
    print(
        f"added {added} keys of {settings.keys.key_size} bits"
        + ("" if added == args.count else f" (the pool is full at {settings.keys.max_key_count})")
    )


def cmd_pool_status(args: argparse.Namespace) -> None:
    settings = _settings(args)

    async def work(database: Database) -> dict[str, Any]:
        async with database.session() as session:
            link = await pool.get_link(session, settings.kme_id, settings.kme_id)
            waiting = await pool.undelivered_count(session)
            stored = pool.keys_available(link, settings.keys.key_size) if link else 0
            return {
                "kme_id": settings.kme_id,
                "key_size": settings.keys.key_size,
                "stored_key_count": stored,
                "max_key_count": settings.keys.max_key_count,
                "keys_awaiting_slaves": waiting,
            }

    info = _run_db(settings, work)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for name, value in info.items():
            print(f"{name}: {value}")


# -- db, openapi ---------------------------------------------------------------------------


def cmd_db_upgrade(args: argparse.Namespace) -> None:
    settings = _settings(args)
    asyncio.run(lab.prepare_database(settings))
    print("database is at the newest schema")


def cmd_openapi(args: argparse.Namespace) -> None:
    from kme.app import create_app

    settings = load_settings(args.config) if args.config else Settings()
    document = create_app(settings).openapi()
    text = json.dumps(document, indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)


# -- ipsec ---------------------------------------------------------------------------------


def cmd_ipsec_strongswan(args: argparse.Namespace) -> None:
    from kme.ipsec.adapter import run
    from kme.ipsec.config import load_adapter_settings

    settings = load_adapter_settings(args.config)
    _setup_logging(settings.log_level)
    logging.getLogger("kme").info(
        "strongSwan PPK adapter %s (%s) for %s",
        settings.name,
        settings.role,
        ", ".join(c.name for c in settings.connections),
    )
    asyncio.run(run(settings))


def cmd_ipsec_config(args: argparse.Namespace) -> None:
    from kme.ipsec.gateways import KMETarget, render
    from kme.ipsec.swanctl import render_strongswan

    settings = _settings(args)
    certs = settings.server.ca_file.parent
    paths = lab.sae_paths(certs, args.sae)

    registered = set(_registered_sae_ids(settings))
    for sae_id in filter(None, (args.sae, args.peer_sae)):
        if sae_id not in registered:
            raise UsageError(f"{sae_id!r} is not a registered SAE (see `kme sae list`)")
    host = args.host or settings.server.host
    if host in ("0.0.0.0", "::"):  # noqa: S104  (a listen address is not one to dial)
        host = socket.gethostname()
    try:
        target = KMETarget(
            kme_id=settings.kme_id,
            host=host,
            port=args.port or settings.server.port,
            sae_id=args.sae,
            peer_sae_id=args.peer_sae,
            ca_file=settings.server.ca_file,
            cert_file=paths.cert,
            key_file=paths.key,
            key_size_bits=settings.keys.key_size,
        )
        text = (
            render_strongswan(target, args.role)
            if args.vendor == "strongswan"
            else render(args.vendor, target)
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    sys.stdout.write(text)


# -- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kme", description="kme: an ETSI GS QKD 014 key-delivery server (KME emulator)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_arg(p: argparse.ArgumentParser, default: bool = True) -> None:
        p.add_argument(
            "--config",
            type=Path,
            default=_default_config() if default else None,
            help="the deployment's kme.toml (default: $KME_CONFIG or ./kme-lab/kme.toml)",
        )

    serve = commands.add_parser(
        "serve",
        help="serve the API over mutual TLS",
        description="Serve the ETSI 014 API. With no configuration, "
        "create a lab in ./kme-lab/ first.",
    )
    config_arg(serve, default=False)
    serve.add_argument("--host", help="address to listen on (default: server.host)")
    serve.add_argument("--port", type=int, help="port to listen on (default: server.port)")
    serve.set_defaults(func=cmd_serve)

    init = commands.add_parser(
        "init",
        help="create a lab: CA, certificates, config, database",
        description="Create a lab directory without serving it.",
    )
    init.add_argument("directory", type=Path)
    init.add_argument(
        "--sae",
        action="append",
        metavar="ID",
        help="register an SAE and issue its client certificate (repeatable; "
        "default SAE_A and SAE_B)",
    )
    init.add_argument(
        "--kme-id", default=lab.DEFAULT_KME_ID, help="this KME's ID (default KME_LAB)"
    )
    init.add_argument(
        "--san",
        action="append",
        metavar="NAME",
        default=[],
        help="extra DNS name or IP address for the server certificate (repeatable)",
    )
    init.add_argument(
        "--fill",
        type=int,
        default=10_000,
        metavar="N",
        help="keys to put in the pool at once (default 10000)",
    )
    init.add_argument("--force", action="store_true", help="replace an existing lab")
    init.set_defaults(func=cmd_init)

    sae = commands.add_parser("sae", help="manage the registered SAEs").add_subparsers(
        dest="sae_command", required=True, metavar="ACTION"
    )
    add = sae.add_parser("add", help="register an SAE (and issue a lab certificate for it)")
    add.add_argument("sae_id")
    config_arg(add)
    add.add_argument("--kme-id", help="the KME the SAE is attached to (default: this KME)")
    pin = add.add_mutually_exclusive_group()
    pin.add_argument("--fingerprint", help="pin the SAE's certificate by its SHA-256 fingerprint")
    pin.add_argument("--cert", type=Path, help="pin the SAE's existing certificate (PEM file)")
    add.add_argument(
        "--size-unit",
        choices=["bits", "bytes"],
        default="bits",
        help="how this SAE's clients mean `size` (bytes: compatibility switch)",
    )
    add.add_argument("--no-cert", action="store_true", help="do not issue a lab certificate")
    add.set_defaults(func=cmd_sae_add)
    lst = sae.add_parser("list", help="list the registered SAEs")
    config_arg(lst)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_sae_list)
    rm = sae.add_parser("remove", help="unregister an SAE (its certificate stops working)")
    rm.add_argument("sae_id")
    config_arg(rm)
    rm.set_defaults(func=cmd_sae_remove)

    pool_cmd = commands.add_parser("pool", help="the key pool").add_subparsers(
        dest="pool_command", required=True, metavar="ACTION"
    )
    fill = pool_cmd.add_parser("fill", help="add N keys of key_size bits now")
    fill.add_argument("count", type=int)
    config_arg(fill)
    fill.set_defaults(func=cmd_pool_fill)
    status = pool_cmd.add_parser("status", help="how many keys are stored")
    config_arg(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_pool_status)

    db = commands.add_parser("db", help="the database").add_subparsers(
        dest="db_command", required=True, metavar="ACTION"
    )
    upgrade = db.add_parser("upgrade", help="migrate the database to the newest schema")
    config_arg(upgrade)
    upgrade.set_defaults(func=cmd_db_upgrade)

    ipsec = commands.add_parser("ipsec", help="IPsec gateways on kme keys").add_subparsers(
        dest="ipsec_command", required=True, metavar="ACTION"
    )
    swan = ipsec.add_parser(
        "strongswan",
        help="run the strongSwan PPK adapter for one gateway",
        description="Fetch keys from this gateway's KME (ETSI 014) and load them into charon "
        "as RFC 8784 PPKs, rotating them; see docs/ipsec.md.",
    )
    swan.add_argument("--config", type=Path, required=True, help="the adapter's TOML file")
    swan.set_defaults(func=cmd_ipsec_strongswan)
    gateway = ipsec.add_parser(
        "config",
        help="print a gateway's configuration for this deployment",
        description="Print a ready-to-paste configuration for a gateway that takes this "
        "KME's keys as RFC 8784 PPKs, with the certificate files to import.",
    )
    gateway.add_argument("vendor", choices=["fortios", "junos", "mikrotik", "strongswan"])
    gateway.add_argument("--sae", required=True, metavar="ID", help="the gateway's SAE ID")
    gateway.add_argument("--peer-sae", metavar="ID", help="the remote gateway's SAE ID")
    gateway.add_argument("--host", help="the KME's name or address as the gateway dials it")
    gateway.add_argument("--port", type=int, help="the KME's port (default: server.port)")
    gateway.add_argument(
        "--role",
        choices=["initiator", "responder"],
        default="initiator",
        help="strongswan: which side this gateway's adapter plays",
    )
    config_arg(gateway)
    gateway.set_defaults(func=cmd_ipsec_config)

    openapi = commands.add_parser("openapi", help="print the OpenAPI document")
    config_arg(openapi, default=False)
    openapi.add_argument("--output", "-o", help="write to this file instead of stdout")
    openapi.set_defaults(func=cmd_openapi)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, UsageError) as exc:
        print(f"kme: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except SQLAlchemyError as exc:
        where = f"{args.config}: " if getattr(args, "config", None) else ""
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(
            f"kme: error: {where}field 'database_url': the database could not be used ({reason})",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    except OSError as exc:
        print(f"kme: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
