"""How `lmdp serve` starts and stops: loopback by default, and SIGTERM/SIGINT shut it down cleanly, letting
in-flight requests finish within --shutdown-timeout and aborting those that would run past it."""
import signal
import threading
import time

import httpx
import openai
import pytest

from lmdp.cli import build_parser


def test_binds_loopback_by_default(server):
    assert build_parser().parse_args(['serve', 'some/model']).host == '127.0.0.1'
    assert f'running on http://127.0.0.1:{server.port}' in server.log()     # the server under test gave no --host


def _stream_then_signal(srv, sig, max_tokens):
    """Start a stream, send `sig` once its first text arrives, read on; (text, finish reason or the error)."""
    client = openai.OpenAI(base_url=srv.url + '/v1', api_key='none', max_retries=0, timeout=60)
    stream = client.completions.create(model='tiny', prompt=[1, 50, 51, 52], max_tokens=max_tokens, temperature=0,
                                       stream=True, extra_body={'ignore_eos': True})
    text, end, sent = '', None, False
    try:
        for chunk in stream:
            text += chunk.choices[0].text
            end = chunk.choices[0].finish_reason or end
            if text and not sent:
                srv.proc.send_signal(sig)
                sent = True
    except (httpx.HTTPError, openai.APIError) as e:     # the server closed the connection mid-stream
        end = e
    return text, end


@pytest.mark.slow
def test_sigterm_lets_an_in_flight_request_finish(start_server, reference):
    from lmdp import GenerationConfig
    srv = start_server('--served-model-name', 'tiny', '--shutdown-timeout', '60')
    try:
        text, end = _stream_then_signal(srv, signal.SIGTERM, max_tokens=100)
        rc = srv.proc.wait(60)
    finally:
        srv.stop()
    assert end == 'length'
    assert text == reference([1, 50, 51, 52], GenerationConfig(max_new_tokens=100, ignore_eos=True)).text
    assert rc == 0
    log = srv.log()
    assert 'Application shutdown complete' in log and 'lmdp serve: shut down' in log
    assert 'Traceback' not in log


@pytest.mark.slow
def test_sigint_aborts_what_would_outlast_the_shutdown_timeout(start_server):
    srv = start_server('--served-model-name', 'tiny', '--shutdown-timeout', '0.5')
    result = {}
    body = {'model': 'tiny', 'prompt': [1, 60, 61], 'max_tokens': 1000, 'temperature': 0, 'ignore_eos': True}
    plain = threading.Thread(target=lambda: result.update(
        plain=httpx.post(srv.url + '/v1/completions', json=body, timeout=60)))
    try:
        plain.start()
        deadline = time.monotonic() + 60
        while srv.metrics()['lmdp_num_requests_running'] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)                 # the plain request is in the engine before the signal
        result['stream'] = _stream_then_signal(srv, signal.SIGINT, 1000)
        rc = srv.proc.wait(60)
        plain.join(60)
    finally:
        srv.stop()
    text, end = result['stream']
    assert end == 'abort', f'the 1000-token stream ended with {end!r}, not a clean abort'
    assert 0 < len(text)
    r = result['plain']
    assert r.status_code == 503 and 'shut down' in r.json()['error']['message']
    assert rc == 0
    log = srv.log()
    assert 'Application shutdown complete' in log and 'lmdp serve: shut down' in log
    assert 'Traceback' not in log and 'timeout graceful shutdown exceeded' not in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + '/health')
