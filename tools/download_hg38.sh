#!/usr/bin/env bash
# Downloads the UCSC softmasked hg38 reference (hg38.fa.gz, ~0.98 GB), checks its md5 against UCSC's
# md5sum.txt, and prepares it for pretraining with the recommended hold-out (valid chr20, test
# chr21+chr22; alt/random/chrUn/chrM dropped by prepare's default --exclude).
#
#   bash tools/download_hg38.sh [DEST=data] [extra nucgpt.data.prepare flags, e.g. --window=4096]
#
# Result: DEST/hg38.fa.gz and DEST/hg38_w8192/ (or _w<window>): {train,valid,test}/*.array_record
# + manifest.json. Rerunning skips a finished download.
set -euo pipefail
DEST=${1:-data}
shift || true
PY=${PYTHON:-python3}
BASE=https://hgdownload.soe.ucsc.edu/goldenPath/hg38/bigZips
WINDOW=8192
for arg in "$@"; do
  case "$arg" in --window=*) WINDOW=${arg#--window=} ;; esac
done

mkdir -p "$DEST"
if [ ! -f "$DEST/hg38.fa.gz" ]; then
  curl -fL --retry 3 -C - -o "$DEST/hg38.fa.gz.part" "$BASE/hg38.fa.gz"
  mv "$DEST/hg38.fa.gz.part" "$DEST/hg38.fa.gz"
fi
if curl -fsL "$BASE/md5sum.txt" -o "$DEST/md5sum.txt"; then
  (cd "$DEST" && grep ' hg38.fa.gz$' md5sum.txt | md5sum -c -)
else
  echo "warning: could not fetch $BASE/md5sum.txt; md5 not checked" >&2
fi

"$PY" -m nucgpt.data.prepare --fasta "$DEST/hg38.fa.gz" --out "$DEST/hg38_w$WINDOW" \
  --valid_chroms chr20 --test_chroms chr21,chr22 "$@"
