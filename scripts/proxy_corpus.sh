#!/usr/bin/env bash
# A few million tokens of real English, offline, for the CPU proxy of ablate.py: the sources of a
# programming language's manual from a Debian package (no install: download + unpack).
#
#   scripts/proxy_corpus.sh [CORPUS] [DATA_DIR]     (1M-token shards, shard 0 = val)
#     python  Python's documentation, its reStructuredText (python3-doc): ~7M tokens -> data/proxy (default)
#     perl    Perl's manual, its POD (perl-doc): ~3.1M tokens -> data/proxy_perl, a second corpus to check
#             that a result on the first is not a property of that one text
#
# The documents (one per source file) are shuffled with a fixed seed, so the val shard is a sample of
# the whole manual, then tokenised by fineweb_edu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${1:-python}
case $CORPUS in
    python) DATA_DIR=${2:-data/proxy}
            pkg=$(apt-cache depends python3-doc 2>/dev/null | awk '/Depends: python3\.[0-9]+-doc/ {print $2; exit}')
            glob='usr/share/doc/python3*/html/_sources/**/*.rst.txt' ;;
    perl)   DATA_DIR=${2:-data/proxy_perl}; pkg=perl-doc; glob='usr/share/perl/*/pod/*.pod' ;;
    *)      echo "error: unknown corpus $CORPUS: choose python or perl" >&2; exit 1 ;;
esac
DOCS=${DATA_DIR%/}_docs.jsonl
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [[ ! -f $DOCS ]]; then
    [[ -n $pkg ]] || { echo "error: apt-cache knows no python3-doc package; is this Debian/Ubuntu?" >&2; exit 1; }
    (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1) || { echo "error: apt-get download $pkg failed" >&2; exit 1; }
    dpkg-deb -x "$tmp"/*.deb "$tmp/x"
    uv run python - "$tmp/x/$glob" "$DOCS" <<'PY'
import glob, json, random, sys
from data import atomic_write
paths = sorted(glob.glob(sys.argv[1], recursive=True))
if not paths:
    sys.exit(f"error: the package holds no {sys.argv[1]}")
docs = [open(p, encoding="utf-8", errors="replace").read() for p in paths]
random.Random(0).shuffle(docs)
with atomic_write(sys.argv[2], "w") as f:
    f.write("".join(json.dumps({"text": d}) + "\n" for d in docs))
print(f"{len(docs)} documents, {sum(map(len, docs)):,} characters -> {sys.argv[2]}")
PY
fi
uv run python fineweb_edu.py --input "$DOCS" --data_dir "$DATA_DIR" --shard_size 1000000
