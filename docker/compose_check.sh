#!/usr/bin/env bash
# The deployment check (`make compose-check`): the compose stack run for real, then torn down.
#
# Starts a Docker engine if none answers (with ../shared/tools/docker-offline-base.sh where it exists, which also
# builds local stand-ins for the base images on a machine without a container registry), builds the images,
# runs `up` with a write key, waits for the entry point, and checks through it: a recommendation, a new item
# posted (401 without the key), an interaction; three replicas, each answering some of 30 reads of the item;
# training on other data (a data directory generated with the trainer image, DATA_DIR + TRAIN_ARGS): a new
# version that the running replicas hot-reload while the item stays served; the same data again trains nothing;
# a restart of the whole stack (the item, the version and the port kept); then `stop`, where every container
# must exit with status 0. Prints the time of each step; exits non-zero on the first failure. Uses compose v2
# (`docker compose`) or v1 (`docker-compose`), whichever is installed.
#
#   make compose-check                    # or: bash docker/compose_check.sh
#   KEEP=1 bash docker/compose_check.sh   # leave the stack running at the end (no teardown)
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT=${PROJECT:-mmfcheck}
PORT=${MMF_PORT:-8000}
KEY=compose-check-$(date +%s)
BASE="http://127.0.0.1:${PORT}"
START=$(date +%s)

step() { printf '[%4ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }
fail() { step "FAILED: $*"; exit 1; }

if ! docker info >/dev/null 2>&1 || ! docker image inspect python:3.11-slim >/dev/null 2>&1; then
  if [ -x ../shared/tools/docker-offline-base.sh ] || [ -f ../shared/tools/docker-offline-base.sh ]; then
    step "starting the engine / building base images (../shared/tools/docker-offline-base.sh)"
    bash ../shared/tools/docker-offline-base.sh >/tmp/compose-check-base.log 2>&1 || fail "base images (see /tmp/compose-check-base.log)"
  fi
fi
docker info >/dev/null 2>&1 || fail "no Docker engine answers"
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
export MMF_API_KEY=$KEY
unset DATA_DIR TRAIN_ARGS
dc() { "${COMPOSE[@]}" -p "$PROJECT" "$@"; }
step "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || true))"

DATA=$(mktemp -d /tmp/compose-check-data.XXXXXX)
teardown() {
  if [ "${KEEP:-0}" != 1 ]; then dc down -v --remove-orphans >/dev/null 2>&1 || true; fi
  docker run --rm -v "$DATA:/d" --entrypoint sh "$(image trainer)" -c 'rm -rf /d/*' >/dev/null 2>&1 || true
  rmdir "$DATA" 2>/dev/null || true
}
TAG=${MMF_IMAGE_TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)}  # the compose file's default tag
image() { echo "metammf-$1:$TAG"; }
trap teardown EXIT

wait_ready() {  # the entry point answers ready (the proxy's /readyz is a replica's)
  for _ in $(seq 1 300); do
    if curl -fsS "$BASE/readyz" 2>/dev/null | grep -q '"ready"'; then return 0; fi
    sleep 2
  done
  return 1
}

wait_healthy() {  # N api containers report healthy
  for _ in $(seq 1 300); do
    n=$(for c in $(dc ps -q api); do docker inspect -f '{{.State.Health.Status}}' "$c"; done | grep -c '^healthy$' || true)
    [ "$n" -ge "$1" ] && return 0
    sleep 2
  done
  return 1
}

step "build"
dc build >/tmp/compose-check-build.log 2>&1 || fail "build (see /tmp/compose-check-build.log)"
step "up"
dc up -d >/tmp/compose-check-up.log 2>&1 || fail "up (see /tmp/compose-check-up.log)"
wait_ready || fail "the entry point $BASE never became ready"
step "ready at $BASE"

modalities=$(curl -fsS "$BASE/info" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["modalities"]))')
user=$(curl -fsS "$BASE/recommend/0?k=5" | python3 -c 'import json,sys; d=json.load(sys.stdin); assert len(d["items"]) == 5, d; print(d["strategy"])') \
  || fail "GET /recommend/0"
step "recommend: 5 items (strategy $user)"
body=$(python3 -c "import json; m=json.loads('$modalities'); print(json.dumps({'item_id': 'check-item', 'features': {k: [0.5] * d for k, d in m.items()}}))")
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$BASE/items" -H "X-API-Key: $KEY" -H 'Content-Type: application/json' -d "$body")
[ "$code" = 201 ] || fail "POST /items answered $code"
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$BASE/items" -H 'Content-Type: application/json' -d "$body")
[ "$code" = 401 ] || fail "POST /items without the key answered $code"
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$BASE/interactions" -H "X-API-Key: $KEY" \
  -H 'Content-Type: application/json' -d '{"user_id": "check-user", "item_id": "check-item"}')
[ "$code" = 201 ] || fail "POST /interactions answered $code"
step "item and interaction written (401 without the key)"

step "scale api=3"
dc up -d --scale api=3 >>/tmp/compose-check-up.log 2>&1 || fail "scale"
wait_healthy 3 || fail "3 healthy replicas"
sleep 6  # the proxy re-resolves the replicas every 5 s
for _ in $(seq 1 30); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "$BASE/items/check-item")
  [ "$code" = 200 ] || fail "GET /items/check-item through the entry point answered $code"
done
served=""
for c in $(dc ps -q api); do
  n=$(docker logs "$c" 2>&1 | grep -c 'GET /items/check-item' || true)
  [ "$n" -ge 1 ] || fail "replica $c answered none of the 30 reads"
  served="$served $n"
done
step "30 reads of the new item through the entry point: all 200, per replica:${served}"

artifact_id() { curl -fsS "$BASE/info" | python3 -c 'import json,sys; print(json.load(sys.stdin)["artifact_id"])'; }
all_replicas_serve() {  # 10 reads through the entry point: every answer names artifact $1
  for _ in $(seq 1 10); do [ "$(artifact_id)" = "$1" ] || return 1; done
}
first=$(artifact_id)

step "own data: a data directory generated with the trainer image, then DATA_DIR=... TRAIN_ARGS=\"--data /data\" up"
chmod 777 "$DATA"
docker run --rm -v "$DATA:/out" "$(image trainer)" python -m training generate-synthetic --out /out --users 600 \
  --items 400 --seed 7 --name own >/tmp/compose-check-data.log 2>&1 || fail "generate data (see /tmp/compose-check-data.log)"
export DATA_DIR=$DATA TRAIN_ARGS="--data /data --set train.epochs=5"
dc up -d --scale api=3 >>/tmp/compose-check-up.log 2>&1 || fail "up with DATA_DIR"
for _ in $(seq 1 300); do
  second=$(artifact_id || true)
  [ -n "$second" ] && [ "$second" != "$first" ] && all_replicas_serve "$second" && break
  sleep 2
done
[ "$second" != "$first" ] || fail "the replicas still serve artifact $first"
code=$(curl -s -o /dev/null -w '%{http_code}' "$BASE/items/check-item")
[ "$code" = 200 ] || fail "the online item is gone after the hot reload ($code)"
step "new version $second hot-reloaded by the 3 replicas (was $first); the online item kept"

dc up -d --scale api=3 >>/tmp/compose-check-up.log 2>&1 || fail "up again"
docker wait "$(dc ps -q trainer)" >/dev/null  # `up -d` need not wait for it: the API is up already
dc logs trainer 2>&1 | grep -q '"trained": false' || fail "the same data and config trained again"
[ "$(artifact_id)" = "$second" ] || fail "the version changed without new data"
step "the same data and config again: nothing trained, version $second kept"

step "restart"
dc stop >/dev/null 2>&1 || fail "stop"
dc up -d --scale api=3 >>/tmp/compose-check-up.log 2>&1 || fail "up after stop"
wait_ready || fail "not ready after the restart"
code=$(curl -s -o /dev/null -w '%{http_code}' "$BASE/items/check-item")
[ "$code" = 200 ] || fail "the item is gone after the restart ($code)"
[ "$(artifact_id)" = "$second" ] || fail "another version is served after the restart"
step "after the restart: the item and version $second are served on the same port"

step "stop"
t0=$(date +%s)
dc stop >/dev/null 2>&1 || fail "stop"
bad=""
for c in $(dc ps -a -q); do
  status=$(docker inspect -f '{{.Name}} {{.State.ExitCode}}' "$c")
  case "$status" in *" 0") ;; *) bad="$bad $status" ;; esac
done
[ -z "$bad" ] || fail "containers exited non-zero:$bad"
step "every container ($(dc ps -a -q | wc -l)) exited with status 0; stop took $(( $(date +%s) - t0 )) s"
step "compose check passed"
