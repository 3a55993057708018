"""``peftkit serve``: an OpenAI-compatible server for a base model and many adapters.

    cli/serve.py ── server.py (load once, uvicorn) ── app.py (endpoints, SSE) ── engine.py (decode thread)
                                                        │                           │
                                                   protocol.py (bodies, errors)   batch_cache.py (KV rows)
                                                   adapters.py (ids, runtime load) sequence.py (text, stops)

Needs the ``serve`` extra (FastAPI, uvicorn).
"""
