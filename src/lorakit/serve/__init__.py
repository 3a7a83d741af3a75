"""`lorakit serve`: an OpenAI-compatible HTTP server for one base model and many LoRA adapters.

A request's ``model`` picks the adapter (or the base). One engine thread owns the model and decodes
every running request in one batch, each row through its own adapter (continuous batching: requests
join and leave between steps).

  limits.py     what a request and the server may ask for (frozen dataclass)
  protocol.py   OpenAI request bodies checked; responses and stream chunks built
  errors.py     ApiError: the status and OpenAI's JSON error shape
  adapters.py   the adapter registry (names, folders, chat templates, the --adapter-root rule), load/unload
  kvcache.py    the batch's key/value cache: rows of different lengths, joining and leaving
  sampling.py   next tokens per row (greedy or seeded sampling), stop sequences, streamable text
  engine.py     the engine thread: admission, decoding steps, commands between steps
  app.py        FastAPI routes, the API-key and body-size guard, server-sent events
  server.py     settings, socket, uvicorn

Nothing here is imported by ``import lorakit``; the CLI imports it when `lorakit serve` runs.
"""
