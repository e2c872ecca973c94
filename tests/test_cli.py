"""The `kme` command, run for real as a subprocess: init, serve, sae, pool, db, openapi.

Every test here starts the installed console script (or `python -m kme.cli` when the
script is missing) in a temporary working directory, with every ``KME_*`` variable of
the test run removed from its environment, and checks what a user would see: exit
status, stdout, stderr, the files written, and the HTTPS server it starts.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import queue
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kme.lab import sae_paths
from tests.kmetest import RunningKME

# -- running the command -------------------------------------------------------------------

_SCRIPT = Path(sys.executable).parent / "kme"
KME_COMMAND = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "kme.cli"]

INIT_SAES = ("SAE_A", "SAE_B", "SAE C")
INIT_KME_ID = "KME_X"
INIT_SANS = ("kme.example.net", "10.1.2.3")
INIT_FILL = 50


def kme_env(**extra: str) -> dict[str, str]:
    """The test run's environment without any KME_* variable, plus `extra`."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("KME_")}
    env.update(extra)
    return env


def run_kme(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KME_COMMAND, *map(str, args)],
        cwd=cwd,
        env=env if env is not None else kme_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """Assert the command succeeded; return its stdout."""
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Assert exit status 2 with exactly one line on stderr, no traceback; return the line."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("kme: error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def list_saes(config: Path, cwd: Path) -> dict[str, dict[str, Any]]:
    rows = json.loads(ok(run_kme("sae", "list", "--config", config, "--json", cwd=cwd)))
    return {row["sae_id"]: row for row in rows}


def pool_status(config: Path, cwd: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = ok(run_kme("pool", "status", "--config", config, "--json", cwd=cwd, env=env))
    info: dict[str, Any] = json.loads(out)
    return info


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def common_name(cert: x509.Certificate) -> str:
    value = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(value, str)
    return value


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def mtls_context(certs: Path, sae: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if sae is not None:
        context.load_cert_chain(certs / f"{sae}.pem", certs / f"{sae}.key")
    return context


# -- a `kme serve` subprocess ----------------------------------------------------------------


@dataclass
class Served:
    """A running `kme serve`: its process, the stdout lines seen so far, its stderr file."""

    process: subprocess.Popen[str]
    stderr_path: Path
    lines: list[str] = field(default_factory=list)
    _queue: queue.Queue[str | None] = field(default_factory=queue.Queue)
    _eof: bool = False

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def _failure(self, what: str) -> str:
        return (
            f"{what}; exit status {self.process.poll()}\nstdout so far:\n"
            + "".join(self.lines)
            + f"\nstderr:\n{self.stderr()}"
        )

    def read_until(self, done: Any, timeout: float = 30) -> list[str]:
        """Collect stdout lines until `done(lines)` holds (bounded by `timeout`)."""
        deadline = time.monotonic() + timeout
        while not done(self.lines):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._eof:
                raise AssertionError(self._failure("kme serve did not print what was expected"))
            try:
                line = self._queue.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if line is None:
                self._eof = True
            else:
                self.lines.append(line)
        return self.lines

    def wait_for_port(self, port: int, timeout: float = 20) -> None:
        """Poll until 127.0.0.1:`port` accepts TCP connections (bounded by `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(self._failure("kme serve exited before it listened"))
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(self._failure(f"nothing listened on port {port} within {timeout} s"))


def _pump(stream: IO[str], sink: queue.Queue[str | None]) -> None:
    try:
        for line in stream:
            sink.put(line)
    except (OSError, ValueError):  # the pipe was closed under us at shutdown
        pass
    finally:
        sink.put(None)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=10)
        return
    except subprocess.TimeoutExpired:
        process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@contextlib.contextmanager
def serving(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> Iterator[Served]:
    """Start `kme serve ARGS` in `cwd`; stop it (SIGINT, then SIGTERM, then SIGKILL) at exit."""
    stderr_path = cwd / f"serve-stderr-{time.monotonic_ns()}.log"
    with (
        stderr_path.open("w") as stderr,
        subprocess.Popen(
            [*KME_COMMAND, "serve", *map(str, args)],
            cwd=cwd,
            env=env if env is not None else kme_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        ) as process,
    ):
        assert process.stdout is not None
        served = Served(process, stderr_path)
        reader = threading.Thread(target=_pump, args=(process.stdout, served._queue), daemon=True)
        reader.start()
        try:
            yield served
        finally:
            _stop(process)
            reader.join(timeout=10)


def curl_commands(lines: list[str]) -> dict[str, str]:
    """The printed curl commands, by endpoint."""
    found: dict[str, str] = {}
    for line in lines:
        text = line.strip()
        if not text.startswith("curl "):
            continue
        for endpoint in ("status", "enc_keys", "dec_keys"):
            if f"/{endpoint}" in text:
                found[endpoint] = text
    return found


def has_all_curls(lines: list[str]) -> bool:
    return len(curl_commands(lines)) == 3


# -- the lab made by `kme init` ----------------------------------------------------------------


@dataclass(frozen=True)
class InitLab:
    root: Path  # the working directory `kme init` ran in
    directory: Path  # root / "lab"
    result: subprocess.CompletedProcess[str]

    @property
    def certs(self) -> Path:
        return self.directory / "certs"


@pytest.fixture(scope="module")
def init_lab(tmp_path_factory: pytest.TempPathFactory) -> InitLab:
    """`kme init lab --sae SAE_A --sae SAE_B --sae "SAE C" --kme-id KME_X --san ... --fill 50`."""
    root = tmp_path_factory.mktemp("cli-init")
    args: list[str] = ["init", "lab"]
    for sae_id in INIT_SAES:
        args += ["--sae", sae_id]
    args += ["--kme-id", INIT_KME_ID]
    for san in INIT_SANS:
        args += ["--san", san]
    args += ["--fill", str(INIT_FILL)]
    result = run_kme(*args, cwd=root)
    ok(result)
    return InitLab(root, root / "lab", result)


@pytest.fixture
def lab(init_lab: InitLab, tmp_path: Path) -> Path:
    """A private copy of the init lab at tmp_path/lab, for tests that change it."""
    shutil.copytree(init_lab.directory, tmp_path / "lab")
    return tmp_path / "lab"


CONFIG = Path("lab/kme.toml")  # relative to tmp_path, where the `lab` copy lives


def sae_cert_paths(certs: Path, sae_id: str) -> tuple[Path, Path]:
    """An SAE's certificate and key files; IDs unsafe in file names are percent-encoded."""
    paths = sae_paths(certs, sae_id)
    return paths.cert, paths.key


# -- kme init ----------------------------------------------------------------------------------


def test_init_writes_the_lab_with_private_keys_and_database_owner_only(init_lab: InitLab) -> None:
    """`kme init` writes kme.toml, the CA, the server certificate, every SAE's certificate
    and key, and the database; every private key and the SQLite file (key material) are 0600."""
    lab_dir, certs = init_lab.directory, init_lab.certs
    assert (lab_dir / "kme.toml").is_file()
    assert (certs / "ca.pem").is_file()
    assert (certs / "kme.pem").is_file()
    assert (certs / "kme.key").is_file()
    assert (lab_dir / "kme.db").is_file()
    for sae_id in ("SAE_A", "SAE_B"):  # plain IDs are used as file names as they are
        assert (certs / f"{sae_id}.pem").is_file()
        assert (certs / f"{sae_id}.key").is_file()
    cert, key = sae_cert_paths(certs, "SAE C")
    assert cert.is_file()
    assert key.is_file()
    assert cert.name == "SAE C.pem"  # the contract's certs/<ID>.pem, space and all

    private = [certs / "kme.key", *certs.glob("*.key")]
    assert len(set(private)) == 1 + 1 + len(INIT_SAES)  # server, CA, each SAE
    for path in private:
        assert mode(path) == 0o600, f"{path} has mode {oct(mode(path))}"
    for path in lab_dir.glob("kme.db*"):  # the database and any -wal/-shm file
        assert mode(path) == 0o600, f"{path} has mode {oct(mode(path))}"

    settings = tomllib.loads((lab_dir / "kme.toml").read_text())
    assert settings["kme_id"] == INIT_KME_ID
    assert "kme serve --config" in init_lab.result.stdout


def test_init_server_certificate_is_p256_for_the_kme_id_with_every_san(init_lab: InitLab) -> None:
    """The server certificate is ECDSA P-256, CN = --kme-id, issued by the lab CA for
    serverAuth, with SANs localhost, 127.0.0.1, ::1, the host name and every --san."""
    ca = load_cert(init_lab.certs / "ca.pem")
    server = load_cert(init_lab.certs / "kme.pem")
    public_key = server.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    assert common_name(server) == INIT_KME_ID
    server.verify_directly_issued_by(ca)
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage

    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(sans.get_values_for_type(x509.DNSName))
    ips = set(sans.get_values_for_type(x509.IPAddress))
    assert {"localhost", "kme.example.net"} <= dns
    assert {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.1.2.3"),
    } <= ips
    assert "10.1.2.3" not in dns  # an IP given to --san is an IP SAN, not a DNS name
    host = socket.gethostname()
    try:
        assert ipaddress.ip_address(host) in ips
    except ValueError:
        assert host in dns


def test_init_sae_certificates_name_each_sae_and_chain_to_the_ca(init_lab: InitLab) -> None:
    """Each SAE's certificate has CN = the SAE ID, is issued by ca.pem, is for clientAuth,
    and matches the private key written next to it."""
    ca = load_cert(init_lab.certs / "ca.pem")
    for sae_id in INIT_SAES:
        cert_path, key_path = sae_cert_paths(init_lab.certs, sae_id)
        cert = load_cert(cert_path)
        assert common_name(cert) == sae_id
        cert.verify_directly_issued_by(ca)
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.CLIENT_AUTH in usage
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert key.public_key() == cert.public_key()


def test_init_registers_the_saes_and_fills_the_pool(init_lab: InitLab) -> None:
    """Every --sae is registered for the KME (sae list --json) and the pool holds --fill
    keys of key_size bits (pool status --json)."""
    config = init_lab.directory / "kme.toml"
    registered = list_saes(config, init_lab.root)
    assert set(registered) == set(INIT_SAES)
    for row in registered.values():
        assert row["kme_id"] == INIT_KME_ID
        assert row["size_unit"] == "bits"
        assert row["cert_sha256"] is None

    status = pool_status(config, init_lab.root)
    assert status["kme_id"] == INIT_KME_ID
    assert status["stored_key_count"] == INIT_FILL
    assert status["key_size"] == 256
    assert status["keys_awaiting_slaves"] == 0


def test_init_refuses_an_existing_lab_unless_forced(lab: Path, tmp_path: Path) -> None:
    """`kme init` on an existing lab exits 2 with one sentence and leaves it alone;
    with --force it replaces the CA, the SAEs and the pool."""
    old_ca = (lab / "certs" / "ca.pem").read_bytes()
    refused = run_kme("init", "lab", cwd=tmp_path)
    one_line_error(refused, "lab/kme.toml", "--force")
    assert (lab / "certs" / "ca.pem").read_bytes() == old_ca

    ok(run_kme("init", "lab", "--force", "--sae", "SAE_Q", "--fill", "5", cwd=tmp_path))
    assert (lab / "certs" / "ca.pem").read_bytes() != old_ca
    assert set(list_saes(CONFIG, tmp_path)) == {"SAE_Q"}
    assert pool_status(CONFIG, tmp_path)["stored_key_count"] == 5
    assert mode(lab / "kme.db") == 0o600


@pytest.mark.parametrize(
    ("saes", "fragment"),
    [(["  "], "blank"), (["SAE_A", "SAE_A"], "twice")],
    ids=["blank-sae-id", "duplicate-sae-id"],
)
def test_init_rejects_bad_sae_ids_in_one_sentence(
    tmp_path: Path, saes: list[str], fragment: str
) -> None:
    """A blank or repeated --sae is a usage error (exit 2, one line), and no lab is written."""
    args = [arg for sae_id in saes for arg in ("--sae", sae_id)]
    one_line_error(run_kme("init", "lab", *args, cwd=tmp_path), fragment)
    assert not (tmp_path / "lab" / "kme.toml").exists()


# -- kme sae -----------------------------------------------------------------------------------


def test_sae_add_list_remove(lab: Path, tmp_path: Path) -> None:
    """`sae add` registers an SAE and issues its lab certificate (CN = ID, from the lab CA,
    key 0600); --size-unit and --fingerprint show in `sae list --json`; `sae remove`
    unregisters it."""
    out = ok(run_kme("sae", "add", "SAE_Z", "--config", CONFIG, cwd=tmp_path))
    assert "SAE_Z" in out
    cert_path, key_path = lab / "certs" / "SAE_Z.pem", lab / "certs" / "SAE_Z.key"
    assert cert_path.is_file()
    assert key_path.is_file()
    assert mode(key_path) == 0o600
    cert = load_cert(cert_path)
    assert common_name(cert) == "SAE_Z"
    cert.verify_directly_issued_by(load_cert(lab / "certs" / "ca.pem"))

    ok(
        run_kme(
            "sae", "add", "SAE_BYTES", "--size-unit", "bytes", "--no-cert", "--config", CONFIG,
            cwd=tmp_path,
        )
    )  # fmt: skip
    assert not (lab / "certs" / "SAE_BYTES.pem").exists()
    pin = "AB:" * 31 + "CD"
    ok(run_kme("sae", "add", "SAE_PIN", "--fingerprint", pin, "--config", CONFIG, cwd=tmp_path))

    registered = list_saes(CONFIG, tmp_path)
    assert set(registered) == {*INIT_SAES, "SAE_Z", "SAE_BYTES", "SAE_PIN"}
    assert registered["SAE_Z"]["kme_id"] == INIT_KME_ID
    assert registered["SAE_Z"]["size_unit"] == "bits"
    assert registered["SAE_BYTES"]["size_unit"] == "bytes"
    assert registered["SAE_PIN"]["cert_sha256"] == "ab" * 31 + "cd"

    out = ok(run_kme("sae", "remove", "SAE_Z", "--config", CONFIG, cwd=tmp_path))
    assert "SAE_Z" in out
    assert "SAE_Z" not in list_saes(CONFIG, tmp_path)


def test_sae_commands_report_mistakes_in_one_sentence(lab: Path, tmp_path: Path) -> None:
    """A malformed --fingerprint, a duplicate SAE, and removing an unknown SAE each exit 2
    with one line on stderr, and change nothing."""
    one_line_error(
        run_kme(
            "sae", "add", "SAE_W", "--fingerprint", "not-a-fingerprint", "--config", CONFIG,
            cwd=tmp_path,
        ),
        "fingerprint",
    )  # fmt: skip
    one_line_error(run_kme("sae", "add", "SAE_A", "--config", CONFIG, cwd=tmp_path), "SAE_A")
    one_line_error(
        run_kme("sae", "remove", "SAE_NOPE", "--config", CONFIG, cwd=tmp_path), "SAE_NOPE"
    )
    assert set(list_saes(CONFIG, tmp_path)) == set(INIT_SAES)
    assert not (lab / "certs" / "SAE_W.pem").exists()


# -- kme pool ----------------------------------------------------------------------------------


def test_pool_fill_adds_keys(lab: Path, tmp_path: Path) -> None:
    """`pool fill 25` adds exactly 25 keys to the pool."""
    before = pool_status(CONFIG, tmp_path)["stored_key_count"]
    out = ok(run_kme("pool", "fill", "25", "--config", CONFIG, cwd=tmp_path))
    assert "25" in out
    assert pool_status(CONFIG, tmp_path)["stored_key_count"] == before + 25


def test_pool_fill_stops_at_max_key_count_and_says_so(lab: Path, tmp_path: Path) -> None:
    """Filling past keys.max_key_count adds only up to it, and the output says the pool is
    full; a further fill adds nothing."""
    env = kme_env(KME_KEYS__MAX_KEY_COUNT=str(INIT_FILL + 10))
    out = ok(run_kme("pool", "fill", "25", "--config", CONFIG, cwd=tmp_path, env=env))
    assert "added 10 " in out
    assert "full" in out
    assert str(INIT_FILL + 10) in out
    status = pool_status(CONFIG, tmp_path, env=env)
    assert status["stored_key_count"] == INIT_FILL + 10
    assert status["max_key_count"] == INIT_FILL + 10

    out = ok(run_kme("pool", "fill", "5", "--config", CONFIG, cwd=tmp_path, env=env))
    assert "added 0 " in out
    assert "full" in out
    assert pool_status(CONFIG, tmp_path, env=env)["stored_key_count"] == INIT_FILL + 10


def test_pool_fill_zero_is_a_usage_error(lab: Path, tmp_path: Path) -> None:
    """`pool fill 0` exits 2 with one sentence and leaves the pool as it was."""
    one_line_error(run_kme("pool", "fill", "0", "--config", CONFIG, cwd=tmp_path))
    assert pool_status(CONFIG, tmp_path)["stored_key_count"] == INIT_FILL


def test_db_upgrade_on_a_current_database_is_a_no_op(lab: Path, tmp_path: Path) -> None:
    """`db upgrade` on an up-to-date lab succeeds and keeps SAEs and keys."""
    assert "newest" in ok(run_kme("db", "upgrade", "--config", CONFIG, cwd=tmp_path))
    assert set(list_saes(CONFIG, tmp_path)) == set(INIT_SAES)
    assert pool_status(CONFIG, tmp_path)["stored_key_count"] == INIT_FILL


# -- configuration errors --------------------------------------------------------------------

CONFIG_ERRORS = {
    # case: (text replaced, replacement, fragments the error must contain)
    "key-size-not-multiple-of-8": ("key_size = 256", "key_size = 100", ["keys.key_size", "100"]),
    "port-not-integer": ("port = 8443", 'port = "x"', ["server.port"]),
    "unknown-field": ("[keys]\n", "[keys]\ncolour = 1\n", ["keys.colour"]),
    "broken-toml": ("[link]", "[link", ["TOML"]),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_configuration_error_is_one_sentence_naming_file_and_field(
    init_lab: InitLab, tmp_path: Path, case: str
) -> None:
    """A bad kme.toml stops the command with exit 2 and one line that names the file and
    the offending field, never a traceback."""
    old, new, fragments = CONFIG_ERRORS[case]
    text = (init_lab.directory / "kme.toml").read_text()
    assert text.count(old) == 1
    config = Path("conf") / "kme.toml"
    (tmp_path / "conf").mkdir()
    (tmp_path / config).write_text(text.replace(old, new))
    one_line_error(
        run_kme("pool", "status", "--config", config, cwd=tmp_path), str(config), *fragments
    )


def test_missing_configuration_file_is_one_sentence(tmp_path: Path) -> None:
    """A --config path that does not exist is reported in one line naming the path."""
    one_line_error(
        run_kme("sae", "list", "--config", "nowhere/kme.toml", cwd=tmp_path), "nowhere/kme.toml"
    )


def test_every_command_reports_a_bad_configuration_the_same_way(
    init_lab: InitLab, tmp_path: Path
) -> None:
    """serve, sae, pool, db and openapi all turn a configuration error into the same one
    sentence (exit 2) instead of starting."""
    config = Path("conf") / "kme.toml"
    (tmp_path / "conf").mkdir()
    text = (init_lab.directory / "kme.toml").read_text()
    (tmp_path / config).write_text(text.replace("port = 8443", 'port = "x"'))
    commands = [
        ["serve", "--config", config, "--port", str(free_port())],
        ["sae", "add", "SAE_N", "--config", config],
        ["sae", "list", "--config", config],
        ["pool", "fill", "1", "--config", config],
        ["db", "upgrade", "--config", config],
        ["openapi", "--config", config],
    ]
    lines = {one_line_error(run_kme(*command, cwd=tmp_path), str(config)) for command in commands}
    assert len(lines) == 1, lines


def test_environment_override_error_names_the_variable(init_lab: InitLab, tmp_path: Path) -> None:
    """A bad value from the environment (KME_KEYS__KEY_SIZE=99) is reported in one line
    that names the field and where the value came from, not only the (correct) file."""
    line = one_line_error(
        run_kme(
            "pool", "status", "--config", init_lab.directory / "kme.toml",
            cwd=tmp_path, env=kme_env(KME_KEYS__KEY_SIZE="99"),
        ),
        "99",
    )  # fmt: skip
    assert "KME_KEYS__KEY_SIZE" in line or "environment" in line, line
    assert "key_size" in line, line


# -- --help ----------------------------------------------------------------------------------

HELP_COMMANDS = [
    [],
    ["serve"],
    ["init"],
    ["sae"],
    ["sae", "add"],
    ["sae", "list"],
    ["sae", "remove"],
    ["pool"],
    ["pool", "fill"],
    ["pool", "status"],
    ["db"],
    ["db", "upgrade"],
    ["openapi"],
]


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(["kme", *c]))
def test_every_command_has_help(tmp_path: Path, command: list[str]) -> None:
    """`kme ... --help` exits 0 and prints that command's usage, touching no file."""
    out = ok(run_kme(*command, "--help", cwd=tmp_path))
    assert out.startswith("usage: " + " ".join(["kme", *command]))
    assert list(tmp_path.iterdir()) == []


# -- kme serve -------------------------------------------------------------------------------


def test_serve_without_configuration_creates_a_lab_and_prints_working_curl_commands(
    tmp_path: Path,
) -> None:
    """`kme serve` with no configuration creates ./kme-lab/ (CA, server and SAE_A/SAE_B
    client certificates, kme.toml, migrated database, filled pool), serves HTTPS with
    client certificates, and prints curl commands for status, enc_keys and dec_keys that
    work exactly as printed."""
    port = free_port()
    env = kme_env()
    with serving("--port", str(port), cwd=tmp_path, env=env) as served:
        lines = served.read_until(has_all_curls)
        served.wait_for_port(port)
        printed = "".join(lines)
        assert f"https://localhost:{port}/api/v1/keys" in printed
        assert ":8443" not in printed  # --port wins over the lab's default port

        lab_dir = tmp_path / "kme-lab"
        certs = lab_dir / "certs"
        for path in (
            lab_dir / "kme.toml",
            lab_dir / "kme.db",
            certs / "ca.pem",
            certs / "kme.pem",
            certs / "kme.key",
            *(certs / f"{sae}.{ext}" for sae in ("SAE_A", "SAE_B") for ext in ("pem", "key")),
        ):
            assert path.is_file(), f"{path} is missing"
        for path in (
            certs / "kme.key",
            certs / "SAE_A.key",
            certs / "SAE_B.key",
            lab_dir / "kme.db",
        ):
            assert mode(path) == 0o600, f"{path} has mode {oct(mode(path))}"
        config = tomllib.loads((lab_dir / "kme.toml").read_text())
        assert config["server"]["port"] == 8443  # the default, when no --port is given
        assert config["server"]["host"] == "127.0.0.1"

        # Mandatory client certificates: without one, no HTTP exchange happens.
        with pytest.raises(httpx.TransportError):
            httpx.get(
                f"https://127.0.0.1:{port}/api/v1/keys/SAE_B/status",
                verify=mtls_context(certs, None),
                timeout=10,
            )

        if shutil.which("curl") is None:
            pytest.skip("curl is not installed: the printed commands cannot be run")
        commands = curl_commands(lines)

        def curl(command: str, **extra: str) -> Any:
            # the command exactly as kme printed it, through the shell
            done = subprocess.run(  # noqa: S602
                command,
                shell=True,
                cwd=tmp_path,
                env=kme_env(**extra),
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
            return json.loads(done.stdout)

        status = curl(commands["status"])
        assert status["source_KME_ID"] == status["target_KME_ID"] == "KME_LAB"
        assert status["master_SAE_ID"] == "SAE_A"
        assert status["slave_SAE_ID"] == "SAE_B"
        assert status["key_size"] == 256
        assert status["stored_key_count"] >= 10_000  # filled when the lab was made

        container = curl(commands["enc_keys"])
        keys = container["keys"]
        assert len(keys) == 2
        for key in keys:
            assert len(base64.b64decode(key["key"], validate=True)) == 32

        assert "$KEY_ID" in commands["dec_keys"]
        got = curl(commands["dec_keys"], KEY_ID=keys[0]["key_ID"])
        assert [(k["key_ID"], k["key"]) for k in got["keys"]] == [
            (keys[0]["key_ID"], keys[0]["key"])
        ]
    # SIGINT ends it cleanly: 0, or 130 (128 + SIGINT) as a shell reports an interrupt
    assert served.process.returncode in (0, 130), served.stderr()
    assert "Traceback" not in served.stderr()


def test_serve_with_config_and_port_override_serves_the_init_lab(lab: Path, tmp_path: Path) -> None:
    """`kme serve --config lab/kme.toml --port P` serves the lab made by `kme init` on P
    over mutual TLS and prints that port in its URL."""
    port = free_port()
    with serving("--config", CONFIG, "--port", str(port), cwd=tmp_path) as served:
        lines = served.read_until(has_all_curls)
        served.wait_for_port(port)
        printed = "".join(lines)
        assert f"https://localhost:{port}/api/v1/keys" in printed
        assert ":8443" not in printed
        assert str(CONFIG) in printed
        reply = httpx.get(
            f"https://127.0.0.1:{port}/api/v1/keys/SAE_B/status",
            verify=mtls_context(lab / "certs", "SAE_A"),
            timeout=10,
        )
        assert reply.status_code == 200, reply.text
        status = reply.json()
        assert status["source_KME_ID"] == INIT_KME_ID
        assert status["master_SAE_ID"] == "SAE_A"
        assert status["slave_SAE_ID"] == "SAE_B"
        assert status["stored_key_count"] >= INIT_FILL
    assert "Traceback" not in served.stderr()


def test_serve_takes_the_port_from_configuration_without_port_flag(
    lab: Path, tmp_path: Path
) -> None:
    """Without --port, `kme serve` listens on (and prints) server.port from the
    configuration, here overridden by KME_SERVER__PORT."""
    port = free_port()
    env = kme_env(KME_SERVER__PORT=str(port))
    with serving("--config", CONFIG, cwd=tmp_path, env=env) as served:
        printed = "".join(served.read_until(has_all_curls))
        served.wait_for_port(port)
        assert f"https://localhost:{port}/api/v1/keys" in printed


def test_serve_on_a_busy_port_fails_without_traceback(lab: Path, tmp_path: Path) -> None:
    """When the port is taken, `kme serve` exits 2 with one sentence naming the file, the
    fields and the address, before printing any curl command, and shows no traceback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_kme("serve", "--config", CONFIG, "--port", str(port), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "curl" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "kme.toml" in lines[0]
    assert "server.port" in lines[0]
    assert f"127.0.0.1:{port}" in lines[0]
    assert "in use" in lines[0]


# -- OpenAPI -----------------------------------------------------------------------------------

STATUS_PATH = "/api/v1/keys/{slave_SAE_ID}/status"
ENC_PATH = "/api/v1/keys/{slave_SAE_ID}/enc_keys"
DEC_PATH = "/api/v1/keys/{master_SAE_ID}/dec_keys"


@pytest.fixture(scope="module")
def exported_openapi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The document `kme openapi` prints, without any configuration."""
    out = ok(run_kme("openapi", cwd=tmp_path_factory.mktemp("cli-openapi")))
    document: dict[str, Any] = json.loads(out)
    return document


def _walk(node: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _params(operation: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(p["in"], p["name"]): p for p in operation.get("parameters", [])}


def test_openapi_describes_the_three_endpoints_and_their_errors(
    exported_openapi: dict[str, Any],
) -> None:
    """`kme openapi` documents status, enc_keys (GET, POST) and dec_keys (GET, POST) with
    their real parameters and bodies, 400/401/503 in the Error schema, and no 422."""
    document = exported_openapi
    paths = document["paths"]
    assert set(paths[STATUS_PATH]) == {"get"}
    assert set(paths[ENC_PATH]) == {"get", "post"}
    assert set(paths[DEC_PATH]) == {"get", "post"}

    assert "422" not in {key for key, _ in _walk(document)}
    schemas = document["components"]["schemas"]
    assert {"KeyRequest", "KeyIDs", "KeyContainer", "Status", "Error"} <= set(schemas)
    assert not {"HTTPValidationError", "ValidationError"} & set(schemas)
    for path, item in paths.items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert {"200", "400", "401", "503"} <= set(responses), (path, method)
            for code in ("400", "401", "503"):
                schema = responses[code]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (path, method, code)
    ok_schema = paths[STATUS_PATH]["get"]["responses"]["200"]["content"]["application/json"]
    assert ok_schema["schema"] == {"$ref": "#/components/schemas/Status"}
    for path in (ENC_PATH, DEC_PATH):
        for method in ("get", "post"):
            content = paths[path][method]["responses"]["200"]["content"]["application/json"]
            assert content["schema"] == {"$ref": "#/components/schemas/KeyContainer"}

    enc_get = _params(paths[ENC_PATH]["get"])
    for name in ("number", "size"):
        assert enc_get[("query", name)]["schema"]["type"] == "integer"
        assert not enc_get[("query", name)].get("required", False)
    assert ("path", "slave_SAE_ID") in enc_get
    dec_get = _params(paths[DEC_PATH]["get"])
    assert dec_get[("query", "key_ID")]["required"] is True
    assert ("path", "master_SAE_ID") in dec_get

    enc_body = paths[ENC_PATH]["post"]["requestBody"]
    assert enc_body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/KeyRequest"
    }
    assert not enc_body.get("required", False)  # an empty body is a default request
    dec_body = paths[DEC_PATH]["post"]["requestBody"]
    assert dec_body["required"] is True
    assert dec_body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/KeyIDs"
    }
    for operation in (paths[STATUS_PATH]["get"], paths[ENC_PATH]["get"], paths[DEC_PATH]["get"]):
        assert "requestBody" not in operation


def test_openapi_references_all_resolve(exported_openapi: dict[str, Any]) -> None:
    """Every $ref in the exported document points at a schema the document defines."""
    schemas = exported_openapi["components"]["schemas"]
    refs = {value for key, value in _walk(exported_openapi) if key == "$ref"}
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


def test_openapi_output_file_matches_stdout(
    exported_openapi: dict[str, Any], tmp_path: Path
) -> None:
    """`kme openapi -o FILE` writes the same document it prints, and prints nothing."""
    out = ok(run_kme("openapi", "-o", "api.json", cwd=tmp_path))
    assert out == ""
    assert json.loads((tmp_path / "api.json").read_text()) == exported_openapi


async def test_served_openapi_matches_the_exported_document(
    kme: RunningKME, exported_openapi: dict[str, Any]
) -> None:
    """/openapi.json on a running KME is exactly the document `kme openapi` exports."""
    reply = await kme.client("SAE_A").get("/openapi.json")
    assert reply.status_code == 200, reply.text
    assert reply.json() == exported_openapi


def test_init_refuses_an_sae_id_too_long_for_a_certificate(tmp_path: Path) -> None:
    """`kme init` checks every SAE ID before it writes anything: an ID longer than a
    certificate CN may be (64 characters) is one sentence, exit 2, and no lab."""
    result = run_kme("init", "lab", "--sae", "S" * 65, cwd=tmp_path)
    assert result.returncode == 2
    assert "64 characters" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "lab").exists()
