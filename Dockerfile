# The gateway image: slim, non-root, tiktoken's encodings inside (no network needed at run time).
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
RUN /opt/venv/bin/pip install -r /tmp/requirements.txt

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DJANGO_SETTINGS_MODULE=gateway.settings \
    GATEWAY_VAR_DIR=/app/var \
    TIKTOKEN_CACHE_DIR=/opt/tiktoken
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin gateway
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=gateway:gateway . /app
RUN mkdir -p /app/var/usage-spill /opt/tiktoken \
    && SECRET_KEY=build python manage.py seed_encodings --dir /opt/tiktoken \
    && SECRET_KEY=build python manage.py collectstatic --noinput \
    && chown -R gateway:gateway /app/var && rm -f /app/var/db.sqlite3
USER gateway
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"
# uvicorn with uvloop and httptools: the fastest server measured for this app (see docs/architecture.md);
# daphne works too: daphne -b 0.0.0.0 -p 8000 gateway.asgi:application (never with --proxy-headers; and it
# does not drain on SIGTERM).
# --no-proxy-headers: uvicorn must not rewrite the client address from X-Forwarded-For by its own rules;
# GATEWAY_TRUSTED_PROXIES alone decides whom the gateway believes.
# On SIGTERM uvicorn lets requests in flight finish for up to GATEWAY_SHUTDOWN_GRACE_SECONDS (whole
# seconds), then the usage buffer is flushed: give the container a longer stop timeout than that.
# Workers: one uvicorn process per core the container may use (its CPU affinity and quota), or
# WEB_CONCURRENCY. More than one needs REDIS_URL (shared limits and queues): without it the image
# runs one, and an explicit WEB_CONCURRENCY above 1 is refused at start-up (python -m gateway.workers
# and the gateway.E020 check that migrate runs say why).
ENV GATEWAY_SHUTDOWN_GRACE_SECONDS=30
# Prometheus multiprocess mode: every worker writes its series to files here and a scrape of any of
# them adds them up. Emptied at each start (series of a previous run would be added to this one's);
# it may be a mounted tmpfs, so its files go, not the directory. Set it empty for one process.
ENV PROMETHEUS_MULTIPROC_DIR=/tmp/gateway-metrics
CMD ["sh", "-c", "if [ -n \"$PROMETHEUS_MULTIPROC_DIR\" ]; then mkdir -p \"$PROMETHEUS_MULTIPROC_DIR\" && rm -f \"$PROMETHEUS_MULTIPROC_DIR\"/*.db; fi && python manage.py migrate --noinput && WEB_CONCURRENCY=$(python -m gateway.workers) && export WEB_CONCURRENCY && exec uvicorn gateway.asgi:application --host 0.0.0.0 --port 8000 --workers ${WEB_CONCURRENCY} --loop uvloop --http httptools --lifespan on --no-proxy-headers --no-access-log --timeout-graceful-shutdown ${GATEWAY_SHUTDOWN_GRACE_SECONDS}"]
