#!/usr/bin/env bash
# The README's ablation: one generative base, four fine-tunings with the same budget, each evaluated.
#   bash bench/ablation.sh [OUTDIR]      (about 40 minutes on 2 CPU cores)
# The default `python train.py` pre-trains the base (OUTDIR/unified.base.pt) and fine-tunes `unified`; the other
# methods fine-tune from that same base with the same flags.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs}
mkdir -p "$out"
# a finished checkpoint is kept (re-running the script only re-evaluates)
done_ckpt() { python -c "import sys, train; sys.exit(0 if train.load_checkpoint('$1')['done'] else 1)" 2>/dev/null; }
done_ckpt "$out/unified.pt" || /usr/bin/time -f "%e s wall: python train.py --out $out/unified.pt" python train.py --out "$out/unified.pt" 2> >(tr '\r' '\n' | grep -v 'it/s\]' > "$out/unified.log")
for m in generative vladva sugar; do
  done_ckpt "$out/$m.pt" || python train.py --method "$m" --init "$out/unified.base.pt" --out "$out/$m.pt" 2> >(tr '\r' '\n' | grep -v 'it/s\]' > "$out/$m.log")
done
# the diagnostic of the README: unified without the structure loss
done_ckpt "$out/unified_nostruct.pt" || python train.py --method unified --lambda-structure 0 --init "$out/unified.base.pt" --out "$out/unified_nostruct.pt" 2> >(tr '\r' '\n' | grep -v 'it/s\]' > "$out/unified_nostruct.log")
for m in base unified generative vladva sugar unified_nostruct; do
  ckpt="$out/$m.pt"; [ "$m" = base ] && ckpt="$out/unified.base.pt"
  /usr/bin/time -f "%e s wall: python eval.py --ckpt $ckpt" python eval.py --ckpt "$ckpt" --json "$out/$m.json" > "$out/$m.eval.txt" 2> >(tr '\r' '\n' | grep -v 'it/s\]' > "$out/$m.eval.log")
done
python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
runs = ["base", "generative", "vladva", "sugar", "unified", "unified_nostruct"]
m = {r: json.load(open(f"{out}/{r}.json")) for r in runs}
keys = [k for k in m["unified"] if not k.startswith("speed/")]
print("| metric | " + " | ".join(runs) + " |")
print("|---|" + "---:|" * len(runs))
for k in keys:
    print(f"| {k} | " + " | ".join(f"{m[r][k]:.3f}" for r in runs) + " |")
PY
