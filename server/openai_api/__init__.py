"""The OpenAI-compatible HTTP API (FastAPI on uvicorn) beside gRPC, over the same scheduler:
:mod:`.schemas` (request bodies), :mod:`.generation` (completions and chat), :mod:`.events`
(scheduler streams read from asyncio), :mod:`.app` (routes, errors, auth, limits), :mod:`.server`
(uvicorn in a thread)."""
