# The raymoe platform image: Ray 2.60 with the raymoe library installed and this repository (pipeline
# configs, shipped data) at /opt/raymoe, the working directory of every Ray container in k8s/.
#
#   docker build -t REGISTRY/raymoe:0.1.0 .                                    # CPU
#   docker build --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu -t REGISTRY/raymoe:0.1.0-gpu .
#
# The base is pinned by version tag (no digest was available offline): pin it by digest in your
# registry mirror for reproducible builds. Its Ray, Python (3.11) and user (ray, uid 1000, gid 100)
# match constraints.txt and the manifests' securityContext.
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${BASE_IMAGE}

# Extra package index, e.g. PyTorch's CPU-only wheels for a smaller CPU image (empty: the registry's
# torch==2.13.0, which bundles CUDA).
ARG PIP_EXTRA_INDEX_URL=""

WORKDIR /opt/raymoe

# Dependencies first (a layer that survives code edits), installed exactly as `make venv` does:
# the same constraints file, and urllib3-future built from source with URLLIB3_NO_OVERRIDE=1 so it
# sits beside urllib3 instead of overwriting it.
COPY --chown=1000:100 pyproject.toml constraints.txt README.md ./
COPY --chown=1000:100 platform/ platform/
RUN URLLIB3_NO_OVERRIDE=1 PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL}" \
    pip install --no-cache-dir -c constraints.txt --no-binary urllib3-future . \
 && python -c "import site, pathlib; pathlib.Path(site.getsitepackages()[0], 'raymoe-pipelines.pth').write_text('/opt/raymoe\n')" \
 && python -c "import raymoe, ray; assert ray.__version__ == '2.60.0', ray.__version__"

# The job entrypoints and what they read: `python -m pipelines.X --config pipelines/configs/...`
# works from any directory (the .pth file above puts /opt/raymoe on sys.path), no PYTHONPATH needed.
COPY --chown=1000:100 pipelines/ pipelines/
COPY --chown=1000:100 data/ data/
COPY --chown=1000:100 dashboards/ dashboards/

# DL3064 matches "TOKEN" in TOKENIZERS_PARALLELISM, which is a thread switch, not a secret.
# hadolint ignore=DL3064
ENV RAY_USAGE_STATS_ENABLED=0 \
    TOKENIZERS_PARALLELISM=false

# Non-root, numeric so Kubernetes' runAsNonRoot can verify it.
USER 1000:100
