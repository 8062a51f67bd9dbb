"""Start and stop `vllm serve` as a user types it, on 127.0.0.1, and wait until it answers."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from vllm_submoe.errors import SubMoEError

DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "TOKENIZERS_PARALLELISM": "false"}


def bearer(api_key: str | None) -> dict[str, str]:
    """The Authorization header `vllm serve --api-key` expects (none without a key)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def plugins_with_compression_route(current: str | None) -> str:
    """A `VLLM_PLUGINS` value that adds our route plugin and drops nothing that would load
    without it (an unset `VLLM_PLUGINS` means every installed general plugin loads)."""
    if current is not None:
        names = [n for n in current.split(",") if n]
    else:
        from importlib.metadata import entry_points
        names = sorted({e.name for group in ("vllm.general_plugins", "vllm.stat_logger_plugins", "vllm.platform_plugins",
                                             "vllm.io_processor_plugins") for e in entry_points(group=group)})
    return ",".join(names + ["submoe"] * ("submoe" not in names))


class ServerError(SubMoEError):
    """`vllm serve` exited or never became ready; carries the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    """The `vllm` CLI of the running interpreter's environment."""
    exe = Path(sys.executable).with_name("vllm")
    return str(exe) if exe.exists() else (shutil.which("vllm") or "vllm")


class VLLMServer:
    """`vllm serve MODEL` in a subprocess; a context manager that stops it (and its workers).

    Binds 127.0.0.1 unless `host` says otherwise; `api_key` is passed to `--api-key`, and the
    readiness probe and `headers` carry it. The `/submoe/compression` route is switched on.
    """

    def __init__(self, model: str, *extra_args: str, host: str = "127.0.0.1", port: int | None = None,
                 log_path: Path | None = None, model_flag: bool = False, env: dict | None = None,
                 api_key: str | None = None, startup_timeout: float = 600):
        self.model, self.host, self.port = model, host, port or free_port()
        self.extra_args, self.model_flag, self.api_key = list(extra_args), model_flag, api_key
        self.log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-serve-{self.port}.log"
        self.env = {**os.environ, **{k: v for k, v in DEFAULT_ENV.items() if k not in os.environ}, **(env or {})}
        self.env["VLLM_PLUGINS"] = plugins_with_compression_route(self.env.get("VLLM_PLUGINS"))
        if any(a.split("=")[0] == "--kv-cache-memory-bytes" for a in self.extra_args):
            # On CPU the legacy VLLM_CPU_KVCACHE_SPACE overrides the flag: the flag asked wins.
            self.env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host  # where this machine reaches it
        return f"http://{host}:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.api_key)

    @property
    def pid(self) -> int | None:
        """The API server's pid; its engine and workers are its descendants."""
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        model = ["--model", self.model] if self.model_flag else [self.model]
        key = ["--api-key", self.api_key] if self.api_key else []
        return [vllm_executable(), "serve", *model, "--host", self.host, "--port", str(self.port), *key,
                *self.extra_args]

    def start(self) -> "VLLMServer":
        self._log = self.log_path.open("w")
        # Own process group: stopping the server also stops its engine and worker processes.
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:  # failed start, time-out or Ctrl-C: leave nothing running
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                probe = urllib.request.Request(f"{self.base_url}/v1/models", headers=self.headers)
                with urllib.request.urlopen(probe, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise ServerError(f"vllm serve did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        """SIGINT to the whole process group (vLLM shuts down cleanly), SIGKILL to what is left."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self._signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            self._signal(signal.SIGKILL)  # engine core / workers that outlived the API server
            self.proc.wait()
        finally:
            self._log.close()
            self.proc = None

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
