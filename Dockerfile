# kme in a container: the image serves whatever lab or deployment is mounted at /data.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kme ./kme
COPY migrations ./migrations
RUN pip install --no-cache-dir . \
    && useradd --system --home-dir /data kme && mkdir /data && chown kme /data
USER kme
WORKDIR /data
EXPOSE 8443
# First start: make a lab whose server certificate also names the `kme` service host.
CMD ["sh", "-c", "[ -f /data/kme.toml ] || kme init /data --san kme; exec kme serve --config /data/kme.toml --host 0.0.0.0"]
