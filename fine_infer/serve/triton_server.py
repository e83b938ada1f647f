"""A local NVIDIA Triton Inference Server from the ``nvidia-pytriton`` wheel, for repositories ``fine-infer
triton-repo`` writes: what the tests, the benchmark and a CPU box use.

    python -m fine_infer.serve.triton_server model_repository --http-port 8000

``pip install --no-deps nvidia-pytriton`` brings the ``tritonserver`` binary with its Python backend (and no ONNX
Runtime or TensorRT backend: serve such a machine with ``triton-repo --backend python``). The binary needs three
things this module sets up in a work folder, leaving the installed wheel as it is:

- the Python backend's stub for this Python, which the wheel ships apart (``python_backend_stubs/3.X``), inside a
  backend folder (here: links to the wheel's backend files beside a copy of the stub);
- this environment's ``bin`` first on ``PATH``: the stub's interpreter finds its packages (fine-infer among them)
  through the ``python3`` it finds there; and the wheel's libraries and this Python's ``libpython`` on
  ``LD_LIBRARY_PATH``;
- a numpy the stub was built for: nvidia-pytriton 0.7.0's stub (Triton 2.51) reads tensors with the numpy 1 ABI
  and scrambles every tensor under numpy 2. When this environment's numpy does not satisfy the wheel's own numpy
  requirement, the stub gets an overlay environment that puts a folder holding a fitting numpy
  (``pip install --no-deps --target DIR "numpy<2"``; ``stub_packages``) before this environment's packages.

Every wait is bounded; :meth:`TritonServer.stop` ends the server's process group (the server and its stubs).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Sequence

from fine_infer.errors import BackendUnavailableError, ConfigError

HOST = "127.0.0.1"
PYTRITON = "nvidia-pytriton"
INSTALL = "pip install --no-deps nvidia-pytriton"
STUB_PACKAGES_ENV = "FINE_INFER_TRITON_STUB_PACKAGES"
STUB_PACKAGES_DEFAULT = "triton-stub-packages"  # looked for in sys.prefix
NUMPY_INSTALL = 'pip install --no-deps --target {dir} "numpy<2"'


def pytriton_root() -> Path:
    """The installed ``pytriton`` package folder (found without importing it: it imports gevent and more)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError(f"no Triton Inference Server here: {INSTALL} (it ships the tritonserver binary "
                                      "and its Python backend)")
    return Path(list(spec.submodule_search_locations)[0])


def tritonserver_binary() -> Path:
    """The ``tritonserver`` binary of the installed ``nvidia-pytriton``."""
    path = pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    if not path.is_file():
        raise BackendUnavailableError(f"{path} is missing; reinstall: {INSTALL}")
    return path


def stub_numpy_fits() -> tuple[bool, str]:
    """Whether this environment's numpy satisfies the wheel's own numpy requirement (what its stub was built
    for), and that requirement."""
    from packaging.requirements import Requirement

    import numpy

    for line in importlib.metadata.requires(PYTRITON) or []:
        req = Requirement(line)
        if req.name == "numpy" and not req.marker:
            return req.specifier.contains(numpy.__version__, prereleases=True), str(req.specifier)
    return True, ""


def default_stub_packages() -> Path | None:
    """``$FINE_INFER_TRITON_STUB_PACKAGES``, else ``<sys.prefix>/triton-stub-packages`` when it exists."""
    env = os.environ.get(STUB_PACKAGES_ENV)
    if env:
        return Path(env)
    p = Path(sys.prefix) / STUB_PACKAGES_DEFAULT
    return p if p.is_dir() else None


def _backend_dir(work: Path) -> Path:
    """``work/backends``: the wheel's Python backend (linked) with the stub for this Python (copied)."""
    src = pytriton_root() / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = src / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (src / "python_backend_stubs").iterdir()) if (src / "python_backend_stubs"
                                                                                   ).is_dir() else []
        raise BackendUnavailableError(f"{PYTRITON} ships no Python backend stub for Python {version} "
                                      f"(it has: {', '.join(have) or 'none'})")
    dst = work / "backends" / "python"
    dst.mkdir(parents=True, exist_ok=True)
    for item in (src / "backends" / "python").iterdir():
        if item.is_file():
            (dst / item.name).symlink_to(item)
    shutil.copy2(stub, dst / stub.name)
    return dst.parent


def _overlay_env(work: Path, stub_packages: Path) -> Path:
    """A virtual environment for the stub: this Python, ``stub_packages`` first, then this environment's
    packages (their ``.pth`` files processed, so editable installs resolve)."""
    import site

    if not any(stub_packages.glob("numpy*")):
        raise ConfigError(f"{stub_packages} holds no numpy: {NUMPY_INSTALL.format(dir=stub_packages)}")
    env = work / "stub-python"
    base = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    lib = env / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    (env / "bin").mkdir(parents=True)
    lib.mkdir(parents=True)
    (env / "bin" / "python3").symlink_to(base)
    (env / "pyvenv.cfg").write_text(f"home = {base.parent}\ninclude-system-site-packages = false\n"
                                    f"version = {sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]}\n")
    lines = [str(stub_packages.resolve())]
    lines += [f"import site; site.addsitedir({p!r})" for p in site.getsitepackages() if Path(p).is_dir()]
    (lib / "fine_infer_stub_overlay.pth").write_text("\n".join(lines) + "\n")
    return env / "bin"


def server_env(work: Path, stub_packages: Path | None = None) -> dict[str, str]:
    """The environment the server (and its stubs) run in; ``stub_packages``: see :func:`default_stub_packages`."""
    env = dict(os.environ)
    fits, spec = stub_numpy_fits()
    if fits:
        bin_dir = Path(sys.executable).parent
    else:
        stub_packages = stub_packages or default_stub_packages()
        if stub_packages is None:
            import numpy

            where = Path(sys.prefix) / STUB_PACKAGES_DEFAULT
            raise BackendUnavailableError(
                f"the Triton Python backend stub of {PYTRITON} needs numpy{spec}, this environment has numpy "
                f"{numpy.__version__}: give it one of its own with {NUMPY_INSTALL.format(dir=where)} (or point "
                f"${STUB_PACKAGES_ENV} at such a folder)")
        bin_dir = _overlay_env(work, Path(stub_packages))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    libs = [str(pytriton_root().parent / "nvidia_pytriton.libs")]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and any(Path(libdir).glob("libpython3*.so*")):
        libs.append(libdir)  # the stub links libpython3.X: this Python's own, not another of the same minor
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    env.pop("PYTHONPATH", None)  # the stub ignores it; keep the server's view the one described here
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class TritonServer:
    """``tritonserver`` on 127.0.0.1 over ``repositories``, on free ports; a context manager.

        with TritonServer([repo]) as server:
            server.wait_ready(timeout=120)
            ...  # server.http_url, server.grpc_url, server.metrics_url
    """

    def __init__(self, repositories: Sequence[str | Path], *, http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, stub_packages: Path | None = None,
                 extra_args: Sequence[str] = (), log: str | Path | None = None, host: str = HOST) -> None:
        """``log``: a file for the server's output (default: one in the work folder, removed by :meth:`stop`), or
        ``"-"`` for this process's own output; ``extra_args`` go to ``tritonserver`` as they are."""
        if not repositories:
            raise ConfigError("give at least one model repository")
        self.repositories = [Path(r).resolve() for r in repositories]
        for r in self.repositories:
            if not r.is_dir():
                raise ConfigError(f"{r} is not a folder")
        self.host = host
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.stub_packages = stub_packages
        self.extra_args = list(extra_args)
        self._work = Path(tempfile.mkdtemp(prefix="fine-infer-triton-"))
        self.log_path = None if log == "-" else Path(log) if log else self._work / "tritonserver.log"
        self.proc: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        cmd = [str(tritonserver_binary())]
        for r in self.repositories:
            cmd.append(f"--model-repository={r}")
        cmd += [f"--backend-directory={self._work / 'backends'}", f"--http-address={self.host}",
                f"--http-port={self.http_port}", f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}", "--exit-timeout-secs=5",
                *self.extra_args]
        return cmd

    def start(self) -> "TritonServer":
        env = server_env(self._work, self.stub_packages)
        _backend_dir(self._work)
        if self.log_path is None:  # "-": the server's output goes where ours does
            self.proc = subprocess.Popen(self.command(), env=env, start_new_session=True, cwd=self._work)
            return self
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, cwd=self._work)
        return self

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-chars:].decode(errors="replace") if self.log_path else "(see above)"
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until ``/v2/health/ready`` answers 200 (every model loaded); raises with the log's tail when the server
        exits or ``timeout`` passes."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BackendUnavailableError(f"tritonserver exited with status {self.proc.returncode}:\n"
                                              f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise BackendUnavailableError(f"tritonserver was not ready within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM to the server's process group (server and stubs), SIGKILL after ``timeout``; returns the exit
        status."""
        proc, self.proc = self.proc, None
        if proc is None:
            self._cleanup()
            return None
        try:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            _signal_group(proc.pid, signal.SIGKILL)  # stubs left behind, if any
            return proc.returncode
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        """Remove the work folder (the log too, unless it was given elsewhere)."""
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the group start_new_session made: this server and the stubs it started
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fine_infer.serve.triton_server",
                                description="Run nvidia-pytriton's tritonserver over model repositories written by "
                                            "fine-infer triton-repo (on 127.0.0.1 unless --host).")
    p.add_argument("repositories", nargs="+", help="model repository folders")
    p.add_argument("--host", default=HOST, help="address to listen on (default %(default)s)")
    p.add_argument("--http-port", type=int, default=8000, help="KServe v2 HTTP port (default %(default)s)")
    p.add_argument("--grpc-port", type=int, default=8001, help="KServe v2 gRPC port (default %(default)s)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default %(default)s)")
    p.add_argument("--stub-packages", type=Path, default=None,
                   help=f"folder with a numpy the Python backend stub fits ({NUMPY_INSTALL.format(dir='DIR')}; "
                        f"default ${STUB_PACKAGES_ENV} or <venv>/{STUB_PACKAGES_DEFAULT})")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every model to load")
    p.add_argument("--log", default="-", help="file for the server's output (default: this terminal)")
    args, extra = p.parse_known_args(argv)
    server = TritonServer(args.repositories, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, stub_packages=args.stub_packages, extra_args=extra,
                          host=args.host, log=args.log)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.start()
        server.wait_ready(args.timeout)
        print(f"tritonserver ready: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.metrics_url}",
              flush=True)
        server.proc.wait()
        return server.proc.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
