#!/usr/bin/env bash
# An SGLang server with kvtier as its HiCache storage backend (L3), sharing one cache with vLLM.
#
#   MODEL=meta-llama/Llama-3.1-8B-Instruct examples/sglang_server.sh
#   CONFIG=examples/configs/cpu-disk-redis.yaml PAGE_SIZE=256 MODEL=... examples/sglang_server.sh
#
# Needs a GPU build of SGLang 0.5.23 (pip install "sglang==0.5.23") and kvtier in the same
# environment. What the flags do:
#   --enable-hierarchical-cache            SGLang's host-memory cache (L2), the level below which
#                                          storage backends (L3) sit
#   --hicache-storage-backend dynamic      load the backend class named in the extra config
#   --hicache-storage-backend-extra-config backend_name / module_path / class_name locate kvtier's
#                                          backend; "interface_v1": 1 selects the zero-copy calls
#                                          (batch_get_v1 / batch_set_v1 on host-pool pages);
#                                          "config" is the kvtier YAML, and any other kvtier key
#                                          overrides it ("redis.url", "namespace", ...)
#   --page-size                            must equal the config's chunk_size (kvtier refuses to
#                                          start otherwise): SGLang's page keys are kvtier's chunk keys
#   --hicache-mem-layout page_first        each page contiguous in host memory (layer_first works too)
#   --hicache-write-policy write_through   back up every page to L2 and on to kvtier
# A vLLM server using the same config (vllm serve $MODEL --kv-transfer-config
# '{"kv_connector":"KVTierConnector","kv_role":"kv_both","kv_connector_extra_config":{"config":"..."}}')
# then shares the cache with this one, for the same model, KV dtype and TP size.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:?set MODEL to a model name or local folder}
CONFIG=${CONFIG:-examples/configs/shared-vllm-sglang.yaml}  # not KVTIER_*: kvtier reads those as overrides
PAGE_SIZE=${PAGE_SIZE:-64}
PORT=${PORT:-30000}

EXTRA=$(printf '{"backend_name":"kvtier","module_path":"kvtier.connector.sglang","class_name":"KVTierHiCacheStorage","interface_v1":1,"config":"%s"}' "$CONFIG")

exec python -m sglang.launch_server --model-path "$MODEL" --port "$PORT" \
    --page-size "$PAGE_SIZE" \
    --enable-hierarchical-cache --hicache-mem-layout page_first --hicache-write-policy write_through \
    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config "$EXTRA"
