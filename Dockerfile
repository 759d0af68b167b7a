# One image for every role of docker-compose.yml: the Ray head (which also runs the search's
# driver), the CPU and GPU workers. PyPI's torch wheels for Linux x86_64 carry CUDA, so the
# same image runs on a GPU when the container is given one.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /opt/evoprune

# the dependencies first, so that a change to the code does not reinstall torch
COPY pyproject.toml README.md ./
RUN mkdir -p evoprune primitives evolve workers db transfer && pip install '.[postgres]' && pip uninstall -y evoprune

COPY . .
RUN pip install --no-deps '.[postgres]' && evoprune --help > /dev/null

# the data sets and the pretrained models live on volumes (docker-compose.yml)
ENV EVOPRUNE_DATA_ROOT=/data EVOPRUNE_CACHE=/cache
CMD ["evoprune", "--help"]
