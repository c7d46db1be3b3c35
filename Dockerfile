# The EUCORA image: Debian's Mosquitto (accounts in password and ACL files) and the
# project with its `server` extra, as `scripts/setup.sh` installs them on a machine.
# compose.yaml runs it. (Endpoints install only the agent: `pip install .`, README.)
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends mosquitto mosquitto-clients \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY service service
COPY cli cli
COPY agent agent
COPY mosquitto mosquitto
RUN pip install --no-cache-dir -e ".[server]"
ENV EUCORA_STACK_DIR=/data
VOLUME /data
EXPOSE 11883 18883 19883 9108
ENTRYPOINT ["eucora"]
