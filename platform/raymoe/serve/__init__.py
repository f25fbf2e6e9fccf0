"""raymoe.serve: OpenAI-compatible serving on Ray Serve with continuous batching.

scheduler (plain Python: admission, chunked prefill, KV budget, preemption) -> engine (prefill,
decode_step, sample over MoETransformer + KVCache) -> text_stream (detokenize, stop strings) ->
http_app (FastAPI, OpenAI schemas and errors) -> app (`build_app(args)`, the Serve application).
"""
