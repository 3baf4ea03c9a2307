"""Real sidecars for the SDK's tests: `fabric dev` (SQLite, embedded saga
engine) and `statefabric-sidecar` on the test Postgres with its locks,
sessions and change updates on the test Redis — the binaries the workspace
built, the services `testenv/up.sh` started (its env.sh exports where).

STATEFABRIC_BIN_DIR says where the binaries are (default: the workspace's
build output, $CARGO_TARGET_DIR/debug)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import statefabric

REPO = Path(__file__).resolve().parents[3]


def bin_dir() -> Path:
    if "STATEFABRIC_BIN_DIR" in os.environ:
        return Path(os.environ["STATEFABRIC_BIN_DIR"])
    target = os.environ.get("CARGO_TARGET_DIR") or str(Path.home() / ".cache/statefabric/target")
    return Path(target) / "debug"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_required(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: source the env.sh that testenv/up.sh writes")
    return value


@dataclass
class Sidecar:
    """A running sidecar process."""

    binary: str
    env: dict[str, str]
    grpc_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    #: The egress listener's URL, when it is on.
    egress: str = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> Sidecar:
        path = bin_dir() / self.binary
        if not path.exists():
            pytest.fail(f"{path} is missing: run `cargo build --workspace --bins` first")
        env = {
            **os.environ,
            "STATEFABRIC_SIDECAR__LISTEN": self.address,
            "STATEFABRIC_ADMIN__LISTEN": f"127.0.0.1:{self.admin_port}",
            "STATEFABRIC_SHUTDOWN__DRAIN_DEADLINE": "5s",
            **self.env,
        }
        self.log = Path(tempfile.mkstemp(prefix=f"{self.binary}-", suffix=".log")[1])
        self.process = subprocess.Popen(
            [str(path), *(["dev"] if self.binary == "fabric" else [])],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
        )
        self.wait_ready()
        return self

    def wait_ready(self, within: float = 30.0) -> None:
        deadline = time.monotonic() + within
        url = f"http://127.0.0.1:{self.admin_port}/healthz/ready"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"{self.binary} exited with {self.process.returncode}:\n{self.stderr()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        pytest.fail(f"{self.binary} not ready within {within} s:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-20000:] if self.log else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        """Stops it and starts it again on the same ports and storage."""
        self.stop()
        self.start()


def dev_sidecar(extra: dict[str, str] | None = None) -> Sidecar:
    data = tempfile.mkdtemp(prefix="statefabric-dev-")
    db = os.path.join(data, "events.db")
    return Sidecar(
        "fabric",
        {
            "STATEFABRIC_STORAGE__SQLITE__PATH": db,
            "STATEFABRIC_SAGAS__SQLITE_PATH": db,
            "STATEFABRIC_API__LISTEN": f"127.0.0.1:{free_port()}",
            "STATEFABRIC_API__GRPC_LISTEN": f"127.0.0.1:{free_port()}",
            **(extra or {}),
        },
    )


def postgres_sidecar(tenant: str | None = None, identity: str = "py-agent") -> Sidecar:
    return Sidecar(
        "statefabric-sidecar",
        {
            "STATEFABRIC_SIDECAR__TENANT": tenant or f"py-{uuid.uuid4().hex[:12]}",
            "STATEFABRIC_SIDECAR__IDENTITY": identity,
            "STATEFABRIC_STORAGE__BACKEND": "postgres",
            "STATEFABRIC_STORAGE__POSTGRES__URL": env_required("STATEFABRIC_TEST_PG_APP_URL"),
            "STATEFABRIC_STORAGE__POSTGRES_MIGRATE_URL": env_required("STATEFABRIC_TEST_PG_ADMIN_URL"),
            "STATEFABRIC_REDIS__MODE": "standalone",
            "STATEFABRIC_REDIS__URLS": env_required("STATEFABRIC_TEST_REDIS_URL"),
            "STATEFABRIC_LOCKS__BACKEND": "redis",
            "STATEFABRIC_SESSIONS__BACKEND": "redis",
            "STATEFABRIC_UPDATES__BACKEND": "redis",
        },
    )


@pytest.fixture(scope="session")
def dev() -> Iterator[Sidecar]:
    """`fabric dev`: the embedded default, with the saga engine."""
    sidecar = dev_sidecar().start()
    yield sidecar
    sidecar.stop()


@pytest.fixture(scope="session")
def on_postgres() -> Iterator[Sidecar]:
    """A sidecar on the test Postgres and Redis."""
    sidecar = postgres_sidecar().start()
    yield sidecar
    sidecar.stop()


@pytest.fixture(params=["fabric-dev", "postgres-redis"])
def sidecar(request: pytest.FixtureRequest) -> Sidecar:
    """Each of the two real sidecars in turn."""
    name = "dev" if request.param == "fabric-dev" else "on_postgres"
    return request.getfixturevalue(name)


@pytest.fixture
async def client(sidecar: Sidecar) -> AsyncIterator[statefabric.Client]:
    async with statefabric.Client(sidecar.address) as c:
        yield c


@pytest.fixture
async def dev_client(dev: Sidecar) -> AsyncIterator[statefabric.Client]:
    async with statefabric.Client(dev.address) as c:
        yield c


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
