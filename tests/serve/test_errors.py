"""Every bad request gets OpenAI's error JSON with its status and a message naming the culprit (never a 500 or a
traceback), the key is checked when the server has one, and the server serves on."""
import httpx
import openai
import pytest

from lmdp import GenerationConfig

OK = {'model': 'tiny', 'prompt': 'Hello', 'max_tokens': 4}
CHAT_OK = {'model': 'tiny', 'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': 4}

# (endpoint, body, status, text the message must contain)
BAD = [
    ('completions', dict(OK, model='gpt-4'), 404, "'gpt-4' does not exist"),
    ('chat/completions', dict(CHAT_OK, model='tiny2'), 404, "'tiny2' does not exist"),
    ('completions', dict(OK, temperature=-0.5), 400, 'temperature'),
    ('completions', dict(OK, top_p=0), 400, 'top_p'),
    ('completions', dict(OK, top_p=1.5), 400, 'top_p'),
    ('completions', dict(OK, top_k=-2), 400, 'top_k'),
    ('completions', dict(OK, min_p=2), 400, 'min_p'),
    ('completions', dict(OK, max_tokens=-1), 400, 'max_tokens'),
    ('completions', dict(OK, max_tokens='many'), 400, 'max_tokens'),
    ('completions', dict(OK, n=3), 400, 'n=3'),
    ('completions', dict(OK, presence_penalty=0.5), 400, 'presence_penalty'),
    ('completions', dict(OK, logit_bias={'5': 10}), 400, 'logit_bias'),
    ('completions', dict(OK, logprobs=21), 400, 'logprobs'),
    ('completions', dict(OK, echo=True), 400, 'echo'),
    ('completions', dict(OK, stop=['']), 400, 'stop'),
    ('completions', dict(OK, repetition_penalty=0), 400, 'repetition_penalty'),
    ('completions', dict(OK, prompt=''), 400, 'empty'),
    ('completions', dict(OK, prompt=[]), 400, 'empty'),
    ('completions', dict(OK, prompt=[1, 5, 70000]), 400, 'outside the vocabulary'),
    ('completions', dict(OK, prompt=[1] * 1024), 400, 'session_len'),
    ('completions', dict(OK, prompt=['fine', 'x ' * 1500]), 400, 'prompt 1: the prompt has'),
    ('completions', dict(OK, prompt=['fine', [1, 2]]), 400, 'prompt: must be a string, a list of strings'),
    ('completions', dict(OK, prompt={'text': 'hi'}), 400, 'prompt: must be a string, a list of strings'),
    ('completions', {k: v for k, v in OK.items() if k != 'prompt'}, 400, 'prompt'),
    ('chat/completions', {k: v for k, v in CHAT_OK.items() if k != 'messages'}, 400, 'messages'),
    ('chat/completions', dict(CHAT_OK, messages=[]), 400, 'messages'),
    ('chat/completions', dict(CHAT_OK, messages=[{'role': 'user', 'content': 'x' * 6000}]), 400, 'session_len'),
    ('chat/completions', dict(CHAT_OK, messages=[{'role': 'user', 'content': [
        {'type': 'image_url', 'image_url': {'url': 'http://x/y.png'}}]}]), 400, 'text only'),
    ('chat/completions', dict(CHAT_OK, top_logprobs=2), 400, 'top_logprobs needs logprobs'),
    ('chat/completions', dict(CHAT_OK, logprobs=True, top_logprobs=50), 400, 'top_logprobs'),
    ('chat/completions', dict(CHAT_OK, tools=[{'type': 'function', 'function': {'name': 'f'}}]), 400, 'tool'),
    ('chat/completions', dict(CHAT_OK, response_format={'type': 'json_object'}), 400, 'json_object'),
]


@pytest.mark.parametrize('endpoint,body,status,culprit', BAD, ids=[f'{s}-{c}' for _, _, s, c in BAD])
@pytest.mark.parametrize('stream', [False, True])
def test_bad_request_gets_its_status_and_says_why(server, api_key, endpoint, body, status, culprit, stream):
    r = httpx.post(f'{server.url}/v1/{endpoint}', json=dict(body, stream=stream),
                   headers={'Authorization': f'Bearer {api_key}'}, timeout=60)
    assert r.status_code == status, r.text
    assert r.headers['content-type'].startswith('application/json')
    error = r.json()['error']
    assert culprit in error['message'], error
    assert error['type'] == 'invalid_request_error'
    assert 'Traceback' not in r.text


def test_malformed_json_is_a_400(server, api_key):
    r = httpx.post(f'{server.url}/v1/completions', content=b'{"model": "tiny", "prompt": ',
                   headers={'Authorization': f'Bearer {api_key}', 'Content-Type': 'application/json'})
    assert r.status_code == 400 and 'JSON' in r.json()['error']['message']


def test_unknown_route_is_a_json_404(server):
    r = httpx.get(f'{server.url}/v1/engines')
    assert r.status_code == 404 and r.json()['error']['type'] == 'not_found_error'


def test_the_openai_client_raises_the_matching_errors(client):
    with pytest.raises(openai.NotFoundError, match='does not exist'):
        client.completions.create(model='nope', prompt='Hi', max_tokens=2)
    with pytest.raises(openai.BadRequestError, match='session_len'):
        client.completions.create(model='tiny', prompt=[1] * 2000, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match='temperature'):
        client.chat.completions.create(model='tiny', messages=[{'role': 'user', 'content': 'Hi'}], temperature=-1)


def test_the_server_serves_on_after_bad_requests(client, reference):
    for _ in range(3):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model='tiny', prompt=[1, 99999], max_tokens=2)
    got = client.completions.create(model='tiny', prompt='Hello there', max_tokens=6, temperature=0)
    assert got.choices[0].text == reference('Hello there', GenerationConfig(max_new_tokens=6), do_preprocess=False).text


@pytest.mark.parametrize('headers,code', [({}, 'missing_api_key'),
                                          ({'Authorization': 'Bearer sk-wrong'}, 'invalid_api_key'),
                                          ({'Authorization': 'sk-lmdp-test'}, 'missing_api_key')])
def test_requests_without_the_key_are_refused(server, headers, code):
    for method, path, body in [('GET', '/v1/models', None), ('POST', '/v1/completions', OK),
                               ('POST', '/v1/chat/completions', CHAT_OK)]:
        r = httpx.request(method, server.url + path, json=body, headers=headers)
        assert r.status_code == 401, (path, r.text)
        assert r.json()['error']['code'] == code
        assert r.headers['www-authenticate'] == 'Bearer'


def test_the_openai_client_with_a_wrong_key_gets_an_authentication_error(server, api_key):
    wrong = openai.OpenAI(base_url=server.url + '/v1', api_key='sk-wrong', max_retries=0)
    with pytest.raises(openai.AuthenticationError, match='API key'):
        wrong.completions.create(model='tiny', prompt='Hi', max_tokens=2)
    right = openai.OpenAI(base_url=server.url + '/v1', api_key=api_key, max_retries=0)
    assert right.completions.create(model='tiny', prompt='Hi', max_tokens=2).choices[0].finish_reason == 'length'


def test_health_and_metrics_need_no_key(server):
    assert httpx.get(server.url + '/health').status_code == 200
    r = httpx.get(server.url + '/metrics')
    assert r.status_code == 200 and 'lmdp_kv_blocks_used{' in r.text
