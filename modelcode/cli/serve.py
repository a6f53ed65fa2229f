"""`modelcode serve`: an OpenAI-compatible HTTP server on the engine, with a chat page at /."""

import logging
import signal


def main(*, model: str | None = None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
         max_seq_len: int | None = None, kv_cache_gb: float | None = None, max_batch_size: int = 64,
         max_batched_tokens: int = 512, dtype: str | None = None, device: str = "cpu",
         drain_seconds: float = 30.0) -> None:
    """Serve a model over HTTP: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics,
    /tokenize, /detokenize, and a chat page at /. Ctrl-C or SIGTERM stops taking requests, lets the running
    ones finish (up to --drain-seconds) and exits.

    Args:
        model: checkpoint folder, or an embedded model's name (default: the embedded TinyStories-656K).
        host: the address to listen on (0.0.0.0: every interface).
        port: the TCP port.
        api_key: require `Authorization: Bearer KEY` on the API (the page asks for it; /health stays open).
        max_seq_len: context length in tokens, prompt and reply together (default: the model's).
        kv_cache_gb: memory for the KV cache (default: enough for max_batch_size full contexts, at most a
            quarter of RAM or GPU memory).
        max_batch_size: requests decoded together at most; more wait in a queue.
        max_batched_tokens: prompt tokens prefilled per step (long prompts are split).
        dtype: float32, bfloat16 or float16 (default: the checkpoint's own).
        device: cpu, cuda, cuda:1, ...
        drain_seconds: at shutdown, how long running requests may take to finish.
    """
    import uvicorn

    import modelcode
    from modelcode.api import DEFAULT_MODEL
    from modelcode.engine import Engine
    from modelcode.serving import create_app

    if port < 0 or port > 65535:
        raise ValueError(f"--port {port} is not a TCP port: give 0 to 65535")
    failed: list[Exception] = []

    def load() -> Engine:
        lm = modelcode.load(model, dtype=dtype, device=device, task="causal-lm")
        return Engine(lm, max_batch_size=max_batch_size, max_batched_tokens=max_batched_tokens,
                      kv_cache_bytes=None if kv_cache_gb is None else int(kv_cache_gb * 2**30), max_seq_len=max_seq_len)

    def on_load_error(e: Exception) -> None:
        failed.append(e)
        server.should_exit = True

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    app = create_app(load, model or DEFAULT_MODEL, api_key=api_key, on_load_error=on_load_error)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=drain_seconds,
                                           log_level="info"))
    # Once drained, uvicorn raises again the signal that stopped it, for the handler it found: that exit is clean.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    if failed:
        raise failed[0]
