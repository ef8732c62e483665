# scaletune: one image for migrate, api, worker and reconciler (the command picks the role).
# Layers go from least to most often changed: torch, then the dependencies, then our source.
FROM python:3.11-slim AS build

ARG TORCH_VERSION=2.13.0
# Default PyPI wheels carry CUDA for GPU workers; pass --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# for a smaller CPU-only image.
ARG TORCH_INDEX_URL=https://pypi.org/simple

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

RUN pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml ./
# Install the declared dependencies alone, so editing source does not re-download them.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY README.md ./
COPY scaletune ./scaletune
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
RUN pip install --no-deps .


FROM python:3.11-slim

RUN useradd --create-home --uid 10001 scaletune \
    && mkdir -p /var/lib/scaletune \
    && chown scaletune:scaletune /var/lib/scaletune
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SCALETUNE_HOME=/var/lib/scaletune

USER scaletune
WORKDIR /var/lib/scaletune
EXPOSE 8000
# Alone, the image runs embedded mode; docker-compose.yml runs each role as its own service.
# The API needs a token: pass SCALETUNE_BOOTSTRAP_TOKEN (st_<selector>_<secret>), or read the admin token the
# first start prints (`docker logs`); it is shown once, and later starts on the same volume print nothing.
CMD ["scaletune", "up", "--host", "0.0.0.0"]
