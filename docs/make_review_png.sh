#!/usr/bin/env bash
# Remake docs/review.png: caption the sample photos with the bundled endpoint, write their review page
# (errors first), and screenshot it in headless Chromium at 1280x900. Needs Debian's `chromium`.
# The PNG is quantised to 256 colours with Pillow to stay well under 300 kB.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out="$work/sample_captions"
python -m pipeline run sample_data --job jobs/demo.toml --out "$out" --no-progress || [ $? -eq 1 ]  # 1: corrupt.jpg
python -m pipeline review "$out" --input sample_data --errors-first
chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$work/profile" --hide-scrollbars \
  --window-size=1280,900 --screenshot="$work/review.png" "file://$out/_review.html" 2>/dev/null
python - "$work/review.png" docs/review.png <<'PY'
import sys
from PIL import Image
with Image.open(sys.argv[1]) as shot:
    shot.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(sys.argv[2], optimize=True)
PY
ls -l docs/review.png
