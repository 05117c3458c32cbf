# lightning-ft on a CUDA machine.
#   docker build -t lightning-ft .
#   docker run --gpus all --rm -v "$PWD/runs:/app/runs" -v "$HOME/.cache/huggingface:/root/.cache/huggingface" \
#     lightning-ft fit --config experiments/dreambooth_bnn.yaml --config configs/data/embedded_subject.yaml \
#     --config configs/trainer/gpu_ddp.yaml
# The entrypoint is the project's CLI (python -m lightning_ft.run); any subcommand and override can follow.
# The performance suite on the GPU, one report in runs/performance/performance_suite.md:
#   docker run --gpus all --rm -v "$PWD/runs:/app/runs" --entrypoint python lightning-ft \
#     -m benchmarks.suite --device cuda --precision bf16-mixed --out runs/performance
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# apt packages unpinned on purpose: the pinned CUDA base image fixes the distribution, and its security updates
# should reach a rebuilt image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv git \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app

# The CUDA build of the pinned torch first: a 2.13.0+cu126 wheel satisfies constraints.txt's torch==2.13.0.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126

COPY setup.cfg pyproject.toml constraints.txt README.md ./
COPY lightning_ft ./lightning_ft
RUN pip install -c constraints.txt .

COPY experiments ./experiments
COPY configs ./configs
COPY benchmarks ./benchmarks

ENTRYPOINT ["python", "-m", "lightning_ft.run"]
CMD ["--help"]
