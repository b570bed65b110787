#!/bin/sh
# bench/setup_debian_torch.sh: a second PyTorch baseline for bench/compare: Debian 12's own
# PyTorch (python3-torch, 1.13) in a venv over Debian's /usr/bin/python3, with timm from PyPI
# (no dependencies pulled: torch and torchvision stay Debian's). bench/compare then adds a row
# for it. Root, Debian 12; a benchmarking tool only, never needed to build or test densegrad.
set -eu
VENV=${1:-/opt/torch-debian}
apt-get install -y --no-install-recommends python3-torch python3-torchvision python3-yaml python3-venv python3-pip
/usr/bin/python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install --no-deps timm==1.0.31 huggingface_hub safetensors
"$VENV/bin/python" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'in $VENV')"
