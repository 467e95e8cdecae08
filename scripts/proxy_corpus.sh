#!/usr/bin/env bash
# A few million tokens of real English, offline, for the CPU proxy of ablate.py: the reStructuredText
# sources of Python's documentation, from Debian's python3-doc package (no install: download + unpack).
#
#   scripts/proxy_corpus.sh [DATA_DIR]     (default data/proxy; ~7M tokens, 1M-token shards, shard 0 = val)
#
# The documents (one per source file) are shuffled with a fixed seed, so the val shard is a sample of
# the whole manual, then tokenised by fineweb_edu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:-data/proxy}
DOCS=${DATA_DIR%/}_docs.jsonl
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [[ ! -f $DOCS ]]; then
    pkg=$(apt-cache depends python3-doc | awk '/Depends: python3\.[0-9]+-doc/ {print $2; exit}')
    [[ -n $pkg ]] || { echo "error: apt-cache knows no python3-doc package; is this Debian/Ubuntu?" >&2; exit 1; }
    (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1) || { echo "error: apt-get download $pkg failed" >&2; exit 1; }
    dpkg-deb -x "$tmp"/*.deb "$tmp/x"
    uv run python - "$tmp/x" "$DOCS" <<'PY'
import glob, json, random, sys
from data import atomic_write
paths = sorted(glob.glob(f"{sys.argv[1]}/usr/share/doc/python3*/html/_sources/**/*.rst.txt", recursive=True))
docs = [open(p, encoding="utf-8").read() for p in paths]
random.Random(0).shuffle(docs)
with atomic_write(sys.argv[2], "w") as f:
    f.write("".join(json.dumps({"text": d}) + "\n" for d in docs))
print(f"{len(docs)} documents, {sum(map(len, docs)):,} characters -> {sys.argv[2]}")
PY
fi
uv run python fineweb_edu.py --input "$DOCS" --data_dir "$DATA_DIR" --shard_size 1000000
