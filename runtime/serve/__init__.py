"""``edgekit serve``: an OpenAI-compatible HTTP API over every backend.

``config`` (what the server allows), ``protocol`` (OpenAI request fields to a :class:`SamplingConfig`,
results to response bodies; pure), ``pool`` (models loaded on demand, one generation per loaded instance,
idle ones unloaded), ``generation`` (a backend's blocking token stream bridged to asyncio, cancellable),
``app`` (the Starlette routes and uvicorn). Starlette and uvicorn are imported only by ``app``.
"""
