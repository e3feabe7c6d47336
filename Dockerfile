# dreamstream server for NVIDIA GPUs (Linux x86_64). See docs/deploy.md.
#   docker build -t dreamstream .
#   docker run --gpus all -p 8000:8000 dreamstream            # extra args go to `dreamstream serve`
#   docker run --rm dreamstream --help
#
# No CUDA base image: the PyPI torch wheel for Linux x86_64 brings its own CUDA user-space libraries
# as pip packages. torch 2.13.0 (the version in constraints.txt, which CI tests) brings CUDA 13.0
# (cuda-toolkit 13.0.3, cuDNN 9.20, NCCL 2.29.7, all pinned in constraints.txt). The host needs only:
#   - an NVIDIA driver of branch R580 or newer (>= 580.65.06, the CUDA 13.0 minimum),
#   - a GPU of compute capability 7.5 (Turing) or newer (CUDA 13 dropped Maxwell, Pascal, Volta),
#   - the NVIDIA Container Toolkit (for --gpus).
# Without a GPU the image still runs, on the CPU.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN python -m venv /opt/venv

WORKDIR /app
# Dependencies first: this layer is cached until pyproject.toml or constraints.txt changes. The base
# dependencies and the `server` extra, every version from constraints.txt (regenerate with
# scripts/lock.sh); setuptools and wheel (pinned there too) build the project below.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['server']))" > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt setuptools wheel \
    && rm /tmp/requirements.txt

# Then the code (cheap to rebuild): every package of the distribution.
COPY README.md LICENSE ./
COPY protocol ./protocol
COPY pipeline ./pipeline
COPY server ./server
COPY clients ./clients
COPY dreamstream ./dreamstream
RUN pip install --no-deps --no-build-isolation . \
    && pip check \
    && rm -rf build ./*.egg-info \
    && useradd --create-home --uid 10001 dreamstream

USER dreamstream
# A writable working directory (e.g. `--entrypoint dreamstream ... rollout` writes runs/ here).
WORKDIR /home/dreamstream
EXPOSE 8000
# Liveness, not readiness: /healthz answers 200 while the process runs. Readiness is /readyz: 200 only
# once the model is loaded and warmed up, 503 before and while draining at shutdown; orchestrators
# route traffic by /readyz (Kubernetes readinessProbe) and restart by /healthz (livenessProbe).
# The port opens only after loading and warm-up, so --start-period has to cover them.
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request, sys; \
sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["dreamstream", "serve", "--host", "0.0.0.0", "--port", "8000"]
