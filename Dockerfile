# pubsub API image: `flask pubsub serve` (gunicorn) on 0.0.0.0:8000, as a non-root user.
# Migrations are a separate one-off run of the same image: `docker run ... pubsub flask db upgrade`
# (docker-compose.yml does this in its `migrate` service).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so code changes reuse this layer.
COPY requirements.txt .
RUN pip install -r requirements.txt

RUN useradd --system --create-home --uid 10001 --shell /usr/sbin/nologin pubsub
# The code stays root-owned (read-only to the app); only instance/ is the app's to write: the
# embedded PostgreSQL keeps its data there when PUBSUB_DATABASE_URL is unset.
COPY . .
RUN mkdir -p instance && chown pubsub:pubsub instance

USER pubsub
# `flask` finds wsgi.py in the working directory. Set PUBSUB_DATABASE_URL when running.
ENV PUBSUB_API_HOST=0.0.0.0 \
    PUBSUB_API_PORT=8000
EXPOSE 8000
CMD ["flask", "pubsub", "serve"]
