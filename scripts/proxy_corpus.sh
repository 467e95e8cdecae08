#!/usr/bin/env bash
# A few million tokens of real English, offline, for the CPU proxy of ablate.py: the sources of a
# programming language's manual from a Debian package (no install: download + unpack).
#
#   scripts/proxy_corpus.sh [CORPUS] [DATA_DIR]     (250k-token shards, shard 0 = val)
#     python  Python's documentation, its reStructuredText (python3-doc): ~3.5M tokens -> data/proxy (default)
#     perl    Perl's manual, its POD (perl-doc): ~2.5M tokens -> data/proxy_perl, a second corpus to check
#             that a result on the first is not a property of that one text
#
# Each file is read once (Debian reaches Python's through two paths), and no file or piece twice, so no
# document of the val shard is also in train. Boilerplate paragraphs do recur across files: counting those
# of 200+ characters, 1.2% of Python's val characters and 2.6% of Perl's; counting every one, `::`
# included, 4.8% and 9.1%. (The old corpus had every file twice.) Files are cut at blank lines into pieces
# of about 4,000 characters and the pieces shuffled with a fixed seed: the tokens an evaluation reads come
# from dozens of files, a sample of the whole manual. Then fineweb_edu.py tokenises them.
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${1:-python}
case $CORPUS in
    python) DATA_DIR=${2:-data/proxy}; glob='usr/share/doc/python3*/html/_sources/**/*.rst.txt' ;;
    perl)   DATA_DIR=${2:-data/proxy_perl}; glob='usr/share/perl/*/pod/*.pod' ;;
    *)      echo "error: unknown corpus $CORPUS: choose python or perl" >&2; exit 1 ;;
esac
DOCS=$(dirname "$DATA_DIR")/proxy_${CORPUS}_pieces.jsonl  # (not the old script's _docs.jsonl: files twice, uncut)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [[ ! -f $DOCS ]]; then
    if [[ $CORPUS == python ]]; then  # python3-doc is a metapackage: the manual is in python3.X-doc
        pkg=$(apt-cache depends python3-doc 2>/dev/null | awk '/Depends: python3\.[0-9]+-doc/ {print $2; exit}') || pkg=
        [[ -n $pkg ]] || { echo "error: apt-cache knows no python3-doc package; is this Debian/Ubuntu?" >&2; exit 1; }
    else
        pkg=perl-doc
    fi
    (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1) || { echo "error: apt-get download $pkg failed" >&2; exit 1; }
    dpkg-deb -x "$tmp"/*.deb "$tmp/x"
    uv run python - "$tmp/x/$glob" "$DOCS" <<'PY'
import glob, json, os, random, sys
from data import atomic_write
# perl-doc's generated tables are not prose: its table of contents (the other files' headings) and
# its Unicode property list
GENERATED = ("perltoc.pod", "perluniprops.pod")
paths = sorted({os.path.realpath(p) for p in glob.glob(sys.argv[1], recursive=True)
                if os.path.basename(p) not in GENERATED})
if not paths:
    sys.exit(f"error: the package holds no {sys.argv[1]}")
texts = list(dict.fromkeys(open(p, encoding="utf-8", errors="replace").read() for p in paths))
english = [t for t in texts if sum(c > "\x7f" for c in t) < 0.1 * len(t)]  # not perl-doc's CJK introductions
pieces = []
for text in english:
    piece = ""
    for line in text.splitlines(keepends=True):
        piece += line
        # cut at a blank line once a piece has 4,000 characters (at any line end, if none comes by 16,000)
        if len(piece) >= 4000 and not line.strip() or len(piece) >= 16000:
            pieces.append(piece)
            piece = ""
    if piece.strip():
        pieces.append(piece)
pieces = list(dict.fromkeys(pieces))  # boilerplate that several files repeat, once
random.Random(0).shuffle(pieces)
with atomic_write(sys.argv[2], "w") as f:
    f.write("".join(json.dumps({"text": p}) + "\n" for p in pieces))
print(f"{len(paths)} files, {len(english)} distinct and English, {len(pieces)} pieces, "
      f"{sum(map(len, pieces)):,} characters -> {sys.argv[2]}")
PY
fi
uv run python fineweb_edu.py --input "$DOCS" --data_dir "$DATA_DIR" --shard_size 250000
