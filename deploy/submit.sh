#!/usr/bin/env bash
# Submit a Euphonium-Ray training to a running Ray cluster with `ray job submit` (docs/deploy.md).
#
#   deploy/submit.sh [--address URL] [--pip] [--no-wait] [--submission-id ID] -- TRAIN_ARGS...
#
# TRAIN_ARGS go to `euphonium-ray train`, e.g. `-- --config configs/toy.yaml --set steps=2`; relative paths are
# relative to the repository, which is uploaded as the job's working directory.
#   --address URL   the head's dashboard (job API) address; default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS,
#                   else http://127.0.0.1:8265 (a laptop head, or a `kubectl port-forward` to a KubeRay head)
#   --pip           nodes run a stock Ray image: install the dependencies per job (deploy/runtime_env.pip.yaml)
#                   instead of relying on the project being installed (deploy/runtime_env.yaml)
#   --no-wait       return once submitted; follow with `ray job logs --follow --address URL ID`
# Environment: RAY (the ray command, default `ray`); for a cluster with token authentication (the KubeRay
# manifests) RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (its Secret's auth_token), which `ray job submit` reads.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
address=${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}
runtime_env=$here/runtime_env.yaml
launcher=(euphonium-ray train)
extra=()

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case $1 in
    --address) address=${2:?--address needs a URL}; shift 2 ;;
    --pip) runtime_env=$here/runtime_env.pip.yaml; launcher=(python -m euphonium_ray.cli train); shift ;;
    --no-wait) extra+=(--no-wait); shift ;;
    --submission-id) extra+=(--submission-id "${2:?--submission-id needs a value}"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (training arguments go after --)" >&2; usage >&2; exit 2 ;;
  esac
done
if [ $# -eq 0 ]; then
  echo "error: no training arguments; e.g. deploy/submit.sh -- --config configs/toy.yaml" >&2
  exit 2
fi
case $address in
  http://*|https://*) ;;
  *) echo "error: --address $address is not the http(s) URL of a Ray dashboard (e.g. http://127.0.0.1:8265)" >&2
     exit 2 ;;
esac

cd "$root"
cmd=("${RAY:-ray}" job submit --address "$address" --runtime-env "$runtime_env" --working-dir "$root"
     "${extra[@]}" -- "${launcher[@]}" "$@")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
