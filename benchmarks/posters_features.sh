#!/usr/bin/env bash
# Ingest ../shared/data/movie-posters and extract every modality it has into $OUT (default
# ../posters-run, outside the repository: the posters are research-only and not redistributed).
#   bash benchmarks/posters_features.sh            # ~45 min on 2 CPU cores, OCR is most of it
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-../posters-run}
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=536870912
P=(--params params.yaml --params examples/movie-posters.yaml)
DMMS=${DMMS:-.venv/bin/dmms}
"$DMMS" ingest "${P[@]}" --out "$OUT/ingest" --metrics "$OUT/metrics/ingest.json"
for m in ${MODALITIES:-meta title tags image faces ocr}; do
  "$DMMS" extract "${P[@]}" --modality "$m" --manifest "$OUT/ingest/manifest.parquet" \
    --out "$OUT/features/$m" --metrics "$OUT/metrics/extract/$m.json"
done
