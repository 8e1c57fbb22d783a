"""An embedded Ray head with its dashboard, for `rankray run`: the local stand-in for a KubeRay cluster.

Job submission and the Serve REST API both live in the dashboard, so `ray.init()` (no dashboard by default,
and tied to this process) will not do: the head is `ray start --head --block` in its own process group,
on free ports (another Ray cluster on this machine keeps its own), and stopping it ends that group only,
never other Ray processes (`ray stop` would end every Ray cluster of the user).

The head's address is written next to the model's state file, so a `rankray run` that crashed leaves a
cluster the next run reattaches to, finding its running jobs by name instead of starting them again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from tenacity import RetryError, retry, retry_if_result, stop_after_delay, wait_fixed

START_TIMEOUT_SECONDS = 180.0  # a loaded 2-core machine takes 20-60 s to bring up the head and its agents
STOP_TIMEOUT_SECONDS = 10.0  # then SIGKILL: an ephemeral head has nothing to save
START_ATTEMPTS = 5  # each failed attempt costs ~20 s on an idle machine, ~90 s on a loaded one


class EmbeddedRayError(RuntimeError):
    """The embedded head did not come up; the message carries the end of its log."""


class _ExitedWhileStarting(EmbeddedRayError):
    """`ray start` gave up (on a loaded machine, its raylet can miss Ray's fixed registration timeout)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5.0).status_code == 200
    except httpx.HTTPError:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the id now belongs to someone else's processes
        return False
    return True


@dataclass(frozen=True)
class EmbeddedRay:
    """A running head: where its dashboard answers, and the process group to end."""

    dashboard_url: str
    gcs_address: str
    pid: int  # of `ray start --block`, which leads its process group
    temp_dir: str

    @classmethod
    def start(
        cls,
        num_cpus: int,
        object_store_bytes: int,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        record: Path | None = None,
        attempts: int = START_ATTEMPTS,
    ) -> EmbeddedRay:
        """Start a head and wait until job submission and Serve answer; `record` remembers it for a restart.

        The jobs' entrypoints run `python` from the head's PATH in its working directory, so the head gets
        this interpreter's bin folder first on PATH, and `cwd`. Ray gives its raylet a fixed 30 s to
        register, which a heavily loaded machine can miss: a head that exits while starting is started again.
        """
        for attempt in range(1, attempts + 1):
            head, process = cls._launch(num_cpus, object_store_bytes, cwd, env or {})
            try:
                head._wait_ready(process)
            except _ExitedWhileStarting as err:
                head.stop()
                if attempt == attempts:
                    raise EmbeddedRayError(str(err)) from None
                continue
            except BaseException:
                head.stop()
                raise
            if record is not None:
                record.parent.mkdir(parents=True, exist_ok=True)
                record.write_text(json.dumps(asdict(head), indent=2) + "\n")
            return head
        raise AssertionError("unreachable")

    @classmethod
    def _launch(
        cls, num_cpus: int, object_store_bytes: int, cwd: Path, env: Mapping[str, str]
    ) -> tuple[EmbeddedRay, subprocess.Popen[bytes]]:
        temp_dir = tempfile.mkdtemp(prefix="rankray-ray-", dir="/tmp")  # short: Ray's socket paths are capped
        dashboard_port, gcs_port = free_port(), free_port()
        ports = {
            "ray-client-server-port": free_port(),
            "dashboard-agent-listen-port": free_port(),
            "dashboard-agent-grpc-port": free_port(),
            "metrics-export-port": free_port(),
            "runtime-env-agent-port": free_port(),
            "node-manager-port": free_port(),
            "object-manager-port": free_port(),
        }
        bin_dir = str(Path(sys.executable).parent)
        command = [
            str(Path(bin_dir) / "ray"),
            "start",
            "--head",
            "--block",
            f"--num-cpus={num_cpus}",
            f"--object-store-memory={object_store_bytes}",
            f"--port={gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            *(f"--{flag}={port}" for flag, port in ports.items()),
        ]
        environ = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            **env,
            "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
        }
        with (Path(temp_dir) / "ray-start.log").open("w") as out:
            process = subprocess.Popen(
                command, cwd=cwd, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        head = cls(
            dashboard_url=f"http://127.0.0.1:{dashboard_port}",
            gcs_address=f"127.0.0.1:{gcs_port}",
            pid=process.pid,
            temp_dir=temp_dir,
        )
        return head, process

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        def down() -> bool:
            if process.poll() is not None:
                raise _ExitedWhileStarting(
                    f"`ray start` exited with {process.returncode}:\n{self.log_tail()}"
                )
            # the Serve and job modules come up after the version endpoint; ask them directly
            return not all(
                _answers(self.dashboard_url + path)
                for path in ("/api/version", "/api/jobs/", "/api/serve/applications/")
            )

        waiter = retry(
            retry=retry_if_result(lambda result: result),
            wait=wait_fixed(1.0),
            stop=stop_after_delay(START_TIMEOUT_SECONDS),
        )(down)
        try:
            waiter()
        except RetryError as err:
            raise EmbeddedRayError(
                f"the Ray dashboard at {self.dashboard_url} did not answer within "
                f"{START_TIMEOUT_SECONDS:.0f} s:\n{self.log_tail()}"
            ) from err

    @classmethod
    def reattach(cls, record: Path) -> EmbeddedRay | None:
        """The head a previous run left behind, if it still runs; else None (and the record is dropped)."""
        if not record.exists():
            return None
        try:
            head = cls(**json.loads(record.read_text()))
        except (ValueError, TypeError):
            head = None
        if head is not None and _group_alive(head.pid) and _answers(head.dashboard_url + "/api/version"):
            return head
        record.unlink(missing_ok=True)
        return None

    def log_tail(self, lines: int = 20) -> str:
        log = Path(self.temp_dir) / "ray-start.log"
        return "\n".join(log.read_text().splitlines()[-lines:]) if log.exists() else "(no log)"

    def stop(self, record: Path | None = None) -> None:
        """End the head's process group: SIGTERM lets `ray start --block` stop what it started."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):  # reap our child, so it does not linger as a zombie
                os.waitpid(self.pid, os.WNOHANG)
            if not _group_alive(self.pid):
                break
            time.sleep(0.5)
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if record is not None:
            record.unlink(missing_ok=True)
