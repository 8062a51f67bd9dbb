"""Start and stop `vllm serve` as a user types it, on 127.0.0.1, and wait until it answers."""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from submoe_format.errors import SubMoEError

DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "TOKENIZERS_PARALLELISM": "false"}


class ServerError(SubMoEError):
    """`vllm serve` exited or never became ready; carries the tail of its log."""


def parallel_world_size(args: list[str]) -> int:
    """The worker processes `vllm serve ARGS` starts on this machine: tensor x pipeline x data parallel."""
    ap = argparse.ArgumentParser(add_help=False)
    for flags in (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp"),
                  ("--data-parallel-size", "-dp"), ("--data-parallel-size-local", "-dpl")):
        ap.add_argument(*flags, type=int, default=None)
    known, _ = ap.parse_known_args(args)
    dp = known.data_parallel_size_local or known.data_parallel_size or 1
    return (known.tensor_parallel_size or 1) * (known.pipeline_parallel_size or 1) * dp


def numa_nodes() -> int:
    """Memory (NUMA) nodes the kernel shows; 1 where it shows none."""
    return max(1, len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))))


def cpu_thread_binding(world_size: int, cpus: list[int] | None = None, nodes: int | None = None) -> str | None:
    """`VLLM_CPU_OMP_THREADS_BIND` for `world_size` CPU workers, or None where vLLM's own binding works.

    vLLM's CPU build binds each worker's threads to a NUMA node of its own ("auto"), and refuses to
    start more workers than there are nodes ("Not enough allowed NUMA nodes to bind threads"): on a
    one-node machine tensor parallel 2 needs a list per worker, e.g. "0|1". This splits the CPUs the
    process may run on into `world_size` contiguous lists (each rank gets its share of the cores)."""
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
    nodes = numa_nodes() if nodes is None else nodes
    if world_size <= nodes:
        return None
    if len(cpus) < world_size:
        raise ServerError(f"{world_size} vLLM CPU workers need at least {world_size} CPUs, this process may use "
                          f"{len(cpus)}: lower --tensor-parallel-size / --pipeline-parallel-size")
    share = len(cpus) // world_size
    return "|".join(",".join(map(str, cpus[r * share:(r + 1) * share])) for r in range(world_size))


def cpu_worker_env(args: list[str], env: dict) -> dict:
    """What vLLM's CPU build needs in the environment to start the workers `args` ask for: the thread
    binding, unless the user chose one. (GPU builds ignore it.)"""
    if "VLLM_CPU_OMP_THREADS_BIND" in env:
        return {}
    binding = cpu_thread_binding(parallel_world_size(args))
    return {"VLLM_CPU_OMP_THREADS_BIND": binding} if binding else {}


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
        self.env.update(cpu_worker_env(self.extra_args, self.env))
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
