"""The main job end to end (`python -m pipelines.demo`, `make demo`, `raymoe demo`).

Each stage is the library call its own pipeline makes, with its paths under the demo's work_dir,
all on one embedded Ray cluster:

    config.py    DemoConfig: one section per stage (a pipeline's YAML + overrides, or the load)
    plan.py      every stage's config loaded, rewired under work_dir and checked before Ray starts
    markers.py   <work_dir>/.stages/<stage>.json: what a finished stage wrote, for reruns
    progress.py  the console: a bar while a stage runs, one line after it, its output in a log
    memory.py    peak RSS of the driver and the Ray processes, sampled in a thread
    load.py      the short load through the OpenAI API: a clean window, then a shifted one
    stages.py    ingest, train, export, finetune, federated (what runs before anything is served)
    live.py      serve, load, drift, rebalance (the stages around the running app)
    runner.py    the order, what a rerun reuses, and the closing summary
"""
