"""A real `lmdp serve` process on a free localhost port, over a two-layer tiny llama on the CPU, and a pipeline()
over the same checkpoint with the same engine settings to hold its answers against."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

for _module in ('fastapi', 'uvicorn', 'openai', 'httpx'):
    pytest.importorskip(_module, reason="the serve tests need the extras: pip install -e '.[test,serve]'")
import httpx  # noqa: E402

API_KEY = 'sk-lmdp-test'
REPO = Path(__file__).resolve().parents[2]
# the engine settings the server and the reference pipeline share
ENGINE = dict(device_type='cpu', dtype='float32', block_size=16, max_batch_size=64, enable_prefix_caching=True)


@pytest.fixture(scope='module', autouse=True)
def one_cpu_thread():
    """The reference pipeline in this process: see tests/engine/conftest.py for why one thread is faster."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m lmdp serve MODEL ...` with its output in a log file."""

    def __init__(self, model_path: str, log_path: Path, *args: str):
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.log_path = log_path
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''),
                   OMP_NUM_THREADS='1')
        cmd = [sys.executable, '-m', 'lmdp', 'serve', model_path, '--port', str(self.port), '--device', 'cpu',
               '--dtype', 'float32', '--block-size', '16', '--max-batch-size', '64', *args]
        self._log = open(log_path, 'w')
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f'lmdp serve exited with {self.proc.returncode}:\n{self.log()}')
            try:
                if httpx.get(self.url + '/health', timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f'lmdp serve did not answer /health within {timeout} s:\n{self.log()}')

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def metrics(self) -> dict:
        """/metrics as {name without labels (plus finished_reason/status where present): value}."""
        from lmdp.serve.metrics import parse
        out = {}
        for key, value in parse(httpx.get(self.url + '/metrics', timeout=10).text).items():
            name, _, labels = key.partition('{')
            extra = [p for p in labels.rstrip('}').split(',') if not p.startswith('model_name=')]
            out[name + (f'[{extra[0].split("=")[1].strip(chr(34))}]' if extra else '')] = value
        return out


@pytest.fixture(scope='session')
def serve_model(tmp_path_factory):
    from lmdp.tiny import make_tiny
    return str(make_tiny('llama', tmp_path_factory.mktemp('serve_tiny'), num_hidden_layers=2))


@pytest.fixture(scope='session')
def server(serve_model, tmp_path_factory):
    """One server for the tests of this folder, with an API key and prefix caching (its default)."""
    proc = ServerProcess(serve_model, tmp_path_factory.mktemp('serve') / 'server.log', '--api-key', API_KEY,
                         '--served-model-name', 'tiny')
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope='session')
def reference(serve_model):
    """pipeline() over the served checkpoint with the server's engine settings."""
    from lmdp import PytorchEngineConfig, pipeline
    return pipeline(serve_model, backend_config=PytorchEngineConfig(**ENGINE))


@pytest.fixture
def client(server):
    import openai
    return openai.OpenAI(base_url=server.url + '/v1', api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def aclient(server):
    import openai
    return openai.AsyncOpenAI(base_url=server.url + '/v1', api_key=API_KEY, max_retries=0, timeout=120)


def _wait_idle(server, until=lambda m: True, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if (m['lmdp_num_requests_running'] == 0 and m['lmdp_num_requests_waiting'] == 0 and until(m)) \
                or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


@pytest.fixture(scope='session')
def wait_idle():
    """wait_idle(server, until=None, timeout=60): the server's metrics once no request runs or waits and
    `until(metrics)` holds, or the last ones seen when the timeout passes first."""
    return _wait_idle


@pytest.fixture(scope='session')
def start_server(serve_model, tmp_path_factory):
    """start_server(*args): another `lmdp serve` of the tiny llama, ready; the caller stops it."""
    def start(*args):
        return ServerProcess(serve_model, tmp_path_factory.mktemp('serve') / 'server.log', *args).wait_ready()
    return start


@pytest.fixture(scope='session')
def api_key():
    return API_KEY
