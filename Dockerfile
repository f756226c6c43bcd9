# One image for the API and the worker; the command picks the role.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app

# Dependencies first, from the hashed lock, so code changes reuse this layer.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock

COPY pyproject.toml README.md ./
COPY emailq ./emailq
COPY server ./server
COPY worker ./worker
RUN pip install --no-deps --no-build-isolation . \
    && useradd --system --uid 10001 --no-create-home emailq

USER emailq
EXPOSE 8000

# API by default; the worker service runs `python -m worker` (see docker-compose.yml).
# `python -m server`, not bare uvicorn: it turns uvicorn's X-Forwarded-For handling off, so
# TRUSTED_PROXIES alone decides the client address.
CMD ["python", "-m", "server", "--host", "0.0.0.0", "--port", "8000"]
