"""`lmdp serve`: the OpenAI HTTP API (FastAPI + uvicorn) in front of one engine.

    from lmdp.serve import Server, build_app
    app = build_app(Server(pipeline(path), model_name='my-model'))      # any ASGI server runs it

`lmdp serve PATH` does this and runs uvicorn (see `lmdp.serve.cli`). Needs the `serve` extra (fastapi, uvicorn).
"""


def __getattr__(name):
    # fastapi is optional: importing lmdp.serve (for the command line's parser) must not need it
    if name in ('Server', 'build_app'):
        from . import app
        return getattr(app, name)
    raise AttributeError(name)


__all__ = ['Server', 'build_app']
