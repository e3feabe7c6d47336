# dreamstream on a CUDA GPU: docker build -t dreamstream . && docker run --gpus all -p 8000:8000 dreamstream
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
# Dependencies first (this layer is cached until pyproject.toml changes).
COPY pyproject.toml ./
RUN python3 -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); \
print('\n'.join(d['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# Then the code (cheap to rebuild).
COPY README.md LICENSE ./
COPY pipeline ./pipeline
COPY server ./server
COPY clients ./clients
RUN pip install --no-deps . && useradd --create-home --uid 10001 dreamstream

USER dreamstream
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD python3 -c "import urllib.request, sys; \
sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["dreamstream", "serve", "--host", "0.0.0.0", "--port", "8000"]
