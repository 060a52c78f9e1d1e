#!/usr/bin/env bash
# Container test (issue 5, item 1): builds the image with podman, runs it, and checks
# it from the host as a user would: health, grpcurl, a put and a get through the
# Python client, an s3:// drive read from an S3 endpoint given by AWS_ENDPOINT_URL
# (moto_server on the host, standing in for compose.yaml's MinIO), a non-root process
# under an init, and a clean SIGTERM stop.
#
#   bash tests/container_test.sh        # from anywhere; needs .venv (make install)
#
# Exit codes: 0 all checks passed; 1 a check failed; 77 podman cannot be set up or
# run on this machine (the reason is printed on the last line: "skipped: ...").
# Environment: CONTAINER_ENV (default ../shared/tools/container-env.sh beside the
# repo, which installs podman and builds a local base image, since no image registry
# is reachable here), VENV (default .venv), IMAGE (default drived:test),
# KEEP_CONTAINER=1 to leave the stopped container for inspection.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
VENV=${VENV:-$ROOT/.venv}
IMAGE=${IMAGE:-drived:test}
CONTAINER_ENV=${CONTAINER_ENV:-$ROOT/../shared/tools/container-env.sh}
NAME=drived-ct-$$
T0=$SECONDS
passed=0

step() { printf '\n== [%3ss] %s\n' "$((SECONDS - T0))" "$*"; }
ok() { passed=$((passed + 1)); echo "ok: $*"; }
fail() {
  echo "FAIL: $*" >&2
  if [ -n "${PODMAN:-}" ] && $PODMAN container exists "$NAME" 2>/dev/null; then
    echo "--- container logs ---" >&2
    $PODMAN logs "$NAME" 2>&1 | tail -n 40 >&2
  fi
  echo "container-test: $passed passed, 1 failed"
  exit 1
}
skip() { echo "container-test: skipped: $*"; exit 77; }
# Without systemd, podman cannot schedule the periodic HEALTHCHECK timer and says so on
# every run/stop; harmless here (the check is run by hand below), so those lines are dropped.
no_timer_noise() { grep -v 'unable to get systemd connection' >&2 || true; }

cleanup() {
  [ -n "${MOTO_PID:-}" ] && kill "$MOTO_PID" 2>/dev/null
  [ -n "${WORK:-}" ] && rm -rf "$WORK"
  if [ -n "${PODMAN:-}" ] && [ -z "${KEEP_CONTAINER:-}" ]; then
    $PODMAN rm -f -v "$NAME" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

step "podman setup ($CONTAINER_ENV)"
[ "$(id -u)" = 0 ] || skip "not root: $CONTAINER_ENV installs podman with apt-get and needs root"
[ -f "$CONTAINER_ENV" ] || skip "$CONTAINER_ENV not found (set CONTAINER_ENV)"
echo "(the first run installs podman and builds a local Debian base image: a few minutes)"
# Sourced in a child shell: the script exits on failure, which must not end this one.
if ! envout=$(bash -c 'source "$1" >&2 && declare -p PODMAN BASE_IMAGE BUILD_MOUNTS CONTAINERS_CONF' _ "$CONTAINER_ENV" 2>"/tmp/$NAME.env.log"); then
  why=$(tail -n 3 "/tmp/$NAME.env.log" | tr '\n' ' ')
  rm -f "/tmp/$NAME.env.log"
  skip "podman could not be set up by $CONTAINER_ENV: ${why:-no output}"
fi
rm -f "/tmp/$NAME.env.log"
eval "$envout"
export CONTAINERS_CONF
echo "PODMAN='$PODMAN' BASE_IMAGE=$BASE_IMAGE BUILD_MOUNTS='$BUILD_MOUNTS'"
if ! why=$($PODMAN run --rm --network=host "$BASE_IMAGE" true 2>&1); then
  skip "podman cannot run a container here: $(echo "$why" | tail -n 2 | tr '\n' ' ')"
fi
ok "podman runs containers ($($PODMAN --version))"

for tool in python grpcurl drived moto_server; do
  [ -x "$VENV/bin/$tool" ] || fail "$VENV/bin/$tool missing: run 'make install' first"
done

step "build $IMAGE (BASE_IMAGE=$BASE_IMAGE)"
# --format docker: podman keeps HEALTHCHECK only in docker-format images.
# shellcheck disable=SC2086  # BUILD_MOUNTS is a list of flags
$PODMAN build --format docker --build-arg "BASE_IMAGE=$BASE_IMAGE" $BUILD_MOUNTS -t "$IMAGE" . \
  || fail "podman build"
size=$($PODMAN image inspect --format '{{.Size}}' "$IMAGE")
ok "image built: $((size / 1000000)) MB"
hc=$($PODMAN image inspect --format '{{.Config.Healthcheck}}' "$IMAGE")
case "$hc" in *drived*health*) ok "HEALTHCHECK kept: $hc" ;; *) fail "no HEALTHCHECK in the image: '$hc'" ;; esac

free_port() { "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
WORK=$(mktemp -d /tmp/drived-ct.XXXXXX)
mkdir -p "$WORK/up/sub" "$WORK/down"

step "S3 endpoint for s3:// drives: moto_server on the host (MinIO's stand-in, as in compose.yaml)"
S3_URL=http://127.0.0.1:$(free_port)
"$VENV/bin/moto_server" -H 127.0.0.1 -p "${S3_URL##*:}" >"$WORK/moto.log" 2>&1 &
MOTO_PID=$!
export AWS_ENDPOINT_URL=$S3_URL AWS_ACCESS_KEY_ID=ct-key AWS_SECRET_ACCESS_KEY=ct-secret AWS_REGION=us-east-1
"$VENV/bin/python" - <<'PY' || fail "moto_server at $S3_URL: $(tail -n 5 "$WORK/moto.log")"
import time, boto3
s3 = boto3.client("s3")
for _ in range(100):
    try:
        s3.create_bucket(Bucket="ct-bucket")
        break
    except Exception:
        time.sleep(0.2)
s3.put_object(Bucket="ct-bucket", Key="data/x.csv", Body=b"a,b\n1,2\n")
s3.put_object(Bucket="ct-bucket", Key="data/y.csv", Body=b"a,b\n3,4\n")
PY
ok "moto_server at $S3_URL with s3://ct-bucket/data/{x,y}.csv"

step "run on a free loopback port"
ENDPOINT=127.0.0.1:$(free_port)
$PODMAN run -d --name "$NAME" --network=host -e "DRIVED_LISTEN=$ENDPOINT" \
  -e AWS_ENDPOINT_URL -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -e AWS_REGION "$IMAGE" \
  >/dev/null 2> >(no_timer_noise) || fail "podman run"
echo "container $NAME serving on $ENDPOINT"

step "wait for health"
healthy=
for _ in $(seq 1 60); do
  state=$($PODMAN inspect --format '{{.State.Status}}' "$NAME" 2>/dev/null)
  [ "$state" = running ] || fail "container is $state before becoming healthy"
  if "$VENV/bin/drived" health --endpoint "$ENDPOINT" --timeout 1 >/dev/null 2>&1; then healthy=1; break; fi
  sleep 0.5
done
[ -n "$healthy" ] || fail "drived health --endpoint $ENDPOINT never answered SERVING"
ok "host 'drived health' answers SERVING after $((SECONDS - T0))s"
$PODMAN healthcheck run "$NAME" || fail "podman healthcheck run (the image's HEALTHCHECK) did not pass"
ok "the image's HEALTHCHECK passes inside the container"

step "process: init and non-root"
uid=$($PODMAN exec "$NAME" id -u) || fail "podman exec id"
[ "$uid" != 0 ] || fail "drived runs as root"
pid1=$($PODMAN exec "$NAME" cat /proc/1/cmdline | tr '\0' ' ')
case "$pid1" in *dumb-init*drived*) ;; *) fail "PID 1 is '$pid1', not dumb-init running drived" ;; esac
ok "uid $uid, PID 1: $pid1"

step "put through the Python client"
head -c 3000001 /dev/urandom >"$WORK/up/sub/blob.bin"
echo "hello from the host" >"$WORK/up/hello.txt"
"$VENV/bin/python" - "$ENDPOINT" "$WORK/up" <<'PY' || fail "put through drive_client"
import sys
from drive_client import Drive
endpoint, root = sys.argv[1:]
drive = Drive("lit://ct", component_name="host", root_folder=root, endpoint=endpoint)
drive.put("hello.txt")
drive.put("sub")
print("list:", drive.list("."), drive.list("sub"))
assert drive.list(".") == ["hello.txt", "sub"], drive.list(".")
PY
ok "put hello.txt and sub/ (3 MB) into lit://ct"

step "grpcurl: list, List, Stat"
GRPCURL=("$VENV/bin/grpcurl" -plaintext)
services=$("${GRPCURL[@]}" "$ENDPOINT" list) || fail "grpcurl list"
echo "$services"
grep -qx drive.v1.DriveService <<<"$services" || fail "grpcurl list lacks drive.v1.DriveService"
grep -qx grpc.health.v1.Health <<<"$services" || fail "grpcurl list lacks grpc.health.v1.Health"
ok "grpcurl list shows DriveService and Health"
listing=$("${GRPCURL[@]}" -d '{"drive":"lit://ct","path":"."}' "$ENDPOINT" drive.v1.DriveService/List) \
  || fail "grpcurl List"
echo "$listing"
grep -q '"path": "hello.txt"' <<<"$listing" || fail "grpcurl List does not show hello.txt"
ok "grpcurl List shows hello.txt"
stat=$("${GRPCURL[@]}" -d '{"drive":"lit://ct","path":"sub/blob.bin"}' "$ENDPOINT" drive.v1.DriveService/Stat) \
  || fail "grpcurl Stat"
echo "$stat"
want_sha=$(sha256sum "$WORK/up/sub/blob.bin" | cut -d' ' -f1)
grep -q "\"sha256\": \"$want_sha\"" <<<"$stat" || fail "grpcurl Stat sha256 differs from the local file's $want_sha"
grep -q '"size": "3000001"' <<<"$stat" || fail "grpcurl Stat size is not 3000001"
ok "grpcurl Stat: size and sha256 match the local file"

step "get through the Python client"
"$VENV/bin/python" - "$ENDPOINT" "$WORK/down" <<'PY' || fail "get through drive_client"
import sys
from drive_client import Drive
endpoint, root = sys.argv[1:]
drive = Drive("lit://ct", component_name="reader", root_folder=root, endpoint=endpoint)
print(drive.get("hello.txt"), drive.get("sub"))
PY
cmp "$WORK/up/hello.txt" "$WORK/down/hello.txt" || fail "hello.txt differs after the round trip"
cmp "$WORK/up/sub/blob.bin" "$WORK/down/sub/blob.bin" || fail "sub/blob.bin differs after the round trip"
ok "get returns the same bytes"
$PODMAN exec "$NAME" sh -c 'ls -ln /data/objects/ct/host/' || fail "the file is not under /data in the container"
ok "bytes stored under the /data volume"

step "s3:// drive: Mount through grpcurl, list and get through the Python client"
mount=$("${GRPCURL[@]}" -d '{"drive":"s3://ct-bucket/"}' "$ENDPOINT" drive.v1.DriveService/Mount) \
  || fail "grpcurl Mount s3://ct-bucket/"
echo "$mount"
grep -q '"objects": "2"' <<<"$mount" || fail "Mount did not index 2 objects"
"$VENV/bin/python" - "$ENDPOINT" "$WORK/down" <<'PY' || fail "s3:// list/get through drive_client"
import pathlib, sys
from drive_client import Drive
endpoint, root = sys.argv[1:]
drive = Drive("s3://ct-bucket/", root_folder=root, endpoint=endpoint)
assert drive.list("data") == ["data/x.csv", "data/y.csv"], drive.list("data")
got = drive.get("data/y.csv")
assert pathlib.Path(got).read_bytes() == b"a,b\n3,4\n", got
print("list:", drive.list("data"), "get:", got)
PY
ok "the container reads s3:// drives from the S3 endpoint in AWS_ENDPOINT_URL"

step "SIGTERM: podman stop"
t_stop=$SECONDS
$PODMAN stop --time 40 "$NAME" >/dev/null 2> >(no_timer_noise) || fail "podman stop"
code=$($PODMAN inspect --format '{{.State.ExitCode}}' "$NAME")
echo "stopped in $((SECONDS - t_stop))s, exit code $code"
[ "$code" = 0 ] || fail "exit code $code after SIGTERM, want 0"
ok "exit code 0 after SIGTERM"
logs=$($PODMAN logs "$NAME" 2>&1)
echo "$logs" | tail -n 4
grep -q '"event": "draining"' <<<"$logs" || fail "no \"draining\" log line"
grep -q '"event": "stopped"' <<<"$logs" || fail "no \"stopped\" log line"
ok "logs show draining then stopped"

echo
echo "container-test: all checks passed in $((SECONDS - T0))s"
echo "container-test: $passed passed, 0 failed"
