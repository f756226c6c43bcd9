# One image for the API and the worker; the command picks the role.

# -- build: the project's wheel, with the build backend pinned by hash ---------------------
# The backend comes from requirements-build.lock rather than from whatever setuptools the
# base image happens to ship (the 3.12+ images ship none), and stays out of the final image.
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY requirements-build.lock ./
RUN pip install --require-hashes -r requirements-build.lock
COPY pyproject.toml README.md ./
COPY emailq ./emailq
COPY server ./server
COPY worker ./worker
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# -- run -----------------------------------------------------------------------------------
FROM python:3.11-slim

# LOG_FORMAT=json: a log driver or shipper reads the image's logs, even under `docker run -t`
# (compose passes LOG_FORMAT from .env, `auto` by default: JSON too, with no terminal).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    LOG_FORMAT=json

WORKDIR /app

# Dependencies first, from the hashed lock, so code changes reuse this layer.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock

COPY --from=build /wheels /wheels
RUN pip install --no-deps --no-index /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home emailq

USER emailq
EXPOSE 8000

# The API's readiness (Redis reachable). The worker service overrides it in compose with
# `python -m worker --check` (a recent heartbeat in Redis).
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=3)"]

# API by default; the worker service runs `python -m worker` (see docker-compose.yml).
# `python -m server`, not bare uvicorn: it turns uvicorn's X-Forwarded-For handling off, so
# TRUSTED_PROXIES alone decides the client address.
CMD ["python", "-m", "server", "--host", "0.0.0.0", "--port", "8000"]
