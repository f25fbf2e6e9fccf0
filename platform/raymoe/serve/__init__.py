"""raymoe.serve: OpenAI-compatible serving on Ray Serve with continuous batching.

scheduler (plain Python: admission, chunked prefill, KV budget, preemption) -> engine (prefill,
decode_step, sample over MoETransformer + KVCache) -> text_stream (detokenize, stop strings) ->
http_app (FastAPI; openai_schemas, openai_errors, sse) -> app (`build_app(args)`, the Serve
application; its args are serve_config's `ServeConfig`).
"""
