"""Serving a model directory over HTTP: `lmlab serve --model DIR`.

- `server`: the FastAPI app (`create_app`) over one batched `lmlab.infer.engine.Engine`,
  OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models) plus /tokenize,
  /health and /metrics; `run_server` runs it with uvicorn, loading the model in the
  background;
- `protocol`: the request and response bodies, in OpenAI's shapes;
- `metrics`: the Prometheus metrics (time to first token, time per output token, queue
  depth, running batch, tokens generated, responses by status);
- `static/`: the web chat page, served at `/`.

    >>> from lmlab.serve.server import run_server
    >>> run_server("runs/sft", port=8000, api_key="secret")    # until Ctrl-C
"""
