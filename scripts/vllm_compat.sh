#!/usr/bin/env bash
# `make compat`: install each given vLLM release in its own temporary environment (deleted after)
# and check that the plugin's vLLM internals and model classes resolve there
# (python -m vllm_submoe.selfcheck names what is missing). Needs the package index, and a few GB
# of disk per release (the CUDA build brings CUDA torch); no GPU.
#   bash scripts/vllm_compat.sh "vllm==0.33.0" ...
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
for spec in "$@"; do
  tmp=$(mktemp -d)
  echo "== $spec (in $tmp)"
  if python3 -m venv "$tmp/venv" && "$tmp/venv/bin/pip" install -q "$spec" \
      && "$tmp/venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec \
      && "$tmp/venv/bin/pip" install -q --no-deps -e .; then
    (cd "$tmp" && "$tmp/venv/bin/python" -m vllm_submoe.selfcheck) || status=1
  else
    echo "$spec: could not be installed"; status=1
  fi
  rm -rf "$tmp"
done
exit $status
