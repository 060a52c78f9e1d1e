#!/usr/bin/env bash
# Proto hygiene for protos/: `buf lint`, then `buf breaking` against the last release.
#
#   tools/buf.sh                 lint + breaking (what `make lint` runs)
#   tools/buf.sh lint|breaking   one of them
#
# buf comes from npm (@bufbuild/buf ships the binary) and is installed into .tools/
# on first use (git-ignored); set BUF=/path/to/buf to use another. Besides that one
# npm install, everything is offline: the baseline is read from this clone's .git.
#
# The baseline for `buf breaking` is the newest `v*` tag reachable from HEAD (the
# last release). Until there is one, it is the first commit that has protos/: the
# API as first published on main, so an accidental renumbering or rename is caught
# from day one, not only after the first release. Override with
# BUF_AGAINST=<git ref> (e.g. after an intended pre-release break).
set -euo pipefail

BUF_VERSION=1.75.0
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
TOOLS=$ROOT/.tools
what=${1:-all}

install_buf() {
  if [ -n "${BUF:-}" ]; then return; fi
  BUF=$TOOLS/node_modules/.bin/buf
  if [ -x "$BUF" ] && [ "$("$BUF" --version 2>/dev/null)" = "$BUF_VERSION" ]; then return; fi
  command -v npm >/dev/null || { echo "buf.sh: npm not found: install Node.js (npm), or set BUF=/path/to/buf" >&2; exit 1; }
  echo "buf.sh: installing @bufbuild/buf@$BUF_VERSION into .tools/" >&2
  mkdir -p "$TOOLS"
  npm install --prefix "$TOOLS" --no-save --no-audit --no-fund --loglevel=error "@bufbuild/buf@$BUF_VERSION" >&2
  "$BUF" --version >/dev/null
}

lint() {
  echo "buf lint protos"
  "$BUF" lint protos
  echo "buf lint: clean"
}

breaking() {
  local gitdir ref desc
  gitdir=$(cd "$(git rev-parse --git-common-dir)" && pwd)
  if [ -n "${BUF_AGAINST:-}" ]; then
    ref=$(git rev-parse --verify "${BUF_AGAINST}^{commit}") || { echo "buf.sh: BUF_AGAINST=$BUF_AGAINST is not a commit" >&2; exit 1; }
    desc="BUF_AGAINST=$BUF_AGAINST"
  else
    local tag
    # (no `| head`: with pipefail, an early-closing reader fails the pipeline)
    tag=$(git tag --list 'v*' --merged HEAD --sort=-v:refname)
    tag=${tag%%$'\n'*}
    if [ -n "$tag" ]; then
      ref=$(git rev-parse "$tag^{commit}")
      desc="the last release, $tag"
    else
      ref=$(git rev-list --reverse HEAD -- protos)
      ref=${ref%%$'\n'*}
      if [ -z "$ref" ]; then
        echo "buf breaking: skipped: no commit has protos/ yet, nothing to compare against"
        return
      fi
      if [ "$(git rev-parse --is-shallow-repository)" = true ]; then
        echo "buf.sh: shallow clone: the baseline may be missing; run 'git fetch --unshallow --tags'" >&2
      fi
      desc="no v* release tag yet, so the first commit with protos/, $(git log -1 --format='%h (%s)' "$ref" | cut -c1-80)"
    fi
  fi
  echo "buf breaking protos against $desc"
  "$BUF" breaking protos --against "$gitdir#ref=$ref,subdir=protos"
  echo "buf breaking: no breaking change"
}

install_buf
case "$what" in
  all) lint; breaking ;;
  lint) lint ;;
  breaking) breaking ;;
  *) echo "usage: tools/buf.sh [lint|breaking]" >&2; exit 2 ;;
esac
