"""`lmdp serve PATH`: load a checkpoint into one engine and serve the OpenAI HTTP API with uvicorn.

The model loads before the port is bound, so a broken checkpoint is reported before any client can connect.
SIGINT and SIGTERM shut down gracefully: uvicorn stops accepting connections, in-flight requests may finish for
--shutdown-timeout seconds, then the rest are aborted (a stream ends with finish_reason 'abort' and [DONE], a plain
request gets a 503), and the command exits 0.
"""
import argparse
import json
import logging
import os
import signal
import sys

logger = logging.getLogger('lmdp.serve')

# the checkpoint's generation_config.json values that become the defaults of requests that leave them out (as vLLM
# does); requests that give them win
SAMPLING_DEFAULTS = ('temperature', 'top_p', 'top_k', 'min_p', 'repetition_penalty')


def add_parser(sub):
    p = sub.add_parser('serve', help='serve the OpenAI HTTP API (completions, chat, streaming) with one engine')
    p.add_argument('model_path')
    p.add_argument('--host', default='127.0.0.1', help='address to bind (default 127.0.0.1: this machine only)')
    p.add_argument('--port', type=int, default=23333)
    p.add_argument('--api-key', help='refuse requests without "Authorization: Bearer KEY"')
    p.add_argument('--served-model-name', help='the model name clients send (default: model_path as given)')
    p.add_argument('--custom-module-map', '--module-map', dest='custom_module_map', metavar='FILE',
                   help='a .py file defining MODULE_MAP entries to add or override')
    p.add_argument('--shutdown-timeout', type=float, default=10.0,
                   help='seconds in-flight requests may run on after SIGINT/SIGTERM before they are aborted')
    p.add_argument('--log-level', default='info', choices=['critical', 'error', 'warning', 'info', 'debug'])
    e = p.add_argument_group('engine')
    e.add_argument('--dtype', default='auto')
    e.add_argument('--device', default='auto', choices=['auto', 'cuda', 'cpu'])
    e.add_argument('--session-len', type=int)
    e.add_argument('--max-batch-size', type=int)
    e.add_argument('--cache-max-entry-count', type=float, default=0.8)
    e.add_argument('--num-gpu-blocks', type=int, default=0)
    e.add_argument('--block-size', type=int, default=64)
    e.add_argument('--max-prefill-token-num', type=int, default=4096)
    e.add_argument('--enable-prefix-caching', action=argparse.BooleanOptionalAction, default=True)
    e.add_argument('--mixed-prefill', action=argparse.BooleanOptionalAction, default=False,
                   help='prompt chunks ride along with the running decodes in one step (default off: a step is '
                        'all-prefill or all-decode, prefill first; see notes/performance.md)')
    e.add_argument('--eager-mode', action='store_true', help='no CUDA graphs')
    e.add_argument('--trust-remote-code', action='store_true')
    p.set_defaults(func=cmd_serve)
    return p


class _Terminated(Exception):
    pass


def _raise_terminated(*_):
    raise _Terminated


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ValueError(f"lmdp serve needs FastAPI and uvicorn ({e}); install them with pip install 'lmdp[serve]'")
    from ..api import pipeline
    from ..messages import PytorchEngineConfig
    from .app import Server, build_app

    logging.getLogger('lmdp').setLevel(args.log_level.upper())
    # SIGTERM while loading, or re-raised by uvicorn once it has shut down, ends the command cleanly
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        config = PytorchEngineConfig(
            dtype=args.dtype, device_type=args.device, session_len=args.session_len,
            max_batch_size=args.max_batch_size, cache_max_entry_count=args.cache_max_entry_count,
            num_gpu_blocks=args.num_gpu_blocks, block_size=args.block_size,
            max_prefill_token_num=args.max_prefill_token_num, enable_prefix_caching=args.enable_prefix_caching,
            mixed_prefill=args.mixed_prefill,
            eager_mode=args.eager_mode, custom_module_map=args.custom_module_map,
            trust_remote_code=args.trust_remote_code)
        pipe = pipeline(args.model_path, backend_config=config)
        defaults = checkpoint_sampling_defaults(args.model_path)
        if defaults:
            logger.info("sampling defaults from the checkpoint's generation_config.json: %s", defaults)
        if args.host not in ('127.0.0.1', 'localhost', '::1') and args.api_key is None:
            logger.warning('serving on %s without --api-key: anyone who can reach the port can use the model',
                           args.host)
        server = Server(pipe, args.served_model_name or args.model_path, args.api_key, defaults)
        # uvicorn's own cancelling is the backstop, should an aborted request fail to end
        config = uvicorn.Config(build_app(server), host=args.host, port=args.port, log_level=args.log_level,
                                timeout_graceful_shutdown=args.shutdown_timeout + 10)
        _run(config, server, args.shutdown_timeout)
    except (KeyboardInterrupt, _Terminated):
        pass
    print('lmdp serve: shut down', file=sys.stderr)
    return 0


def _run(config, app_server, grace: float):
    import uvicorn

    class Draining(uvicorn.Server):
        """uvicorn's server, telling the app when shutdown begins so that it ends in-flight requests itself (a
        stream gets its last chunk and [DONE]) rather than having uvicorn cancel them mid-response."""

        async def shutdown(self, sockets=None):
            app_server.drain(grace)
            await super().shutdown(sockets)

    Draining(config).run()


def checkpoint_sampling_defaults(model_path: str) -> dict:
    path = os.path.join(model_path, 'generation_config.json')
    if not os.path.isfile(path):
        return {}
    with open(path, encoding='utf-8') as f:
        hf = json.load(f)
    return {k: hf[k] for k in SAMPLING_DEFAULTS if hf.get(k) is not None}
