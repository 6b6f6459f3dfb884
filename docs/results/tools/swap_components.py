"""Put whole components of one checkpoint into a copy of another: how `runs/small10` was assembled.

    python docs/results/tools/swap_components.py BASE DONOR OUT COMPONENT [COMPONENT ...]
    python docs/results/tools/swap_components.py runs/small6/lmm/best runs/small10/decoder/best \
        runs/small10/lmm/best unet condition_adapter

OUT is BASE with DONOR's folders of the named components (weights and config), and `pipeline.json`'s
SHA-256 of every copied file updated, so `pigeon checkpoint inspect OUT` verifies it. The decoder
stage with `train.style_weight` trains the UNet and the condition adapter; the lmm stage reads neither
(it trains the LLM on the tokenizer's codes, which the decoder stage leaves as they were), so an lmm
checkpoint of the same image stage takes both without retraining. Stage 1 must be trained after it:
it reads the condition adapter's reference embedding.
"""

import hashlib
import json
import shutil
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 5:
        raise SystemExit(__doc__)
    base, donor, out = map(Path, sys.argv[1:4])
    components = sys.argv[4:]
    for folder in (base, donor):
        missing = [c for c in components if not (folder / c).is_dir()]
        if missing:
            raise SystemExit(f"{folder}: no component folder {missing}")
    if out.exists():
        raise SystemExit(f"{out} exists; remove it first")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(base, staging)
    for component in components:
        shutil.rmtree(staging / component)
        shutil.copytree(donor / component, staging / component)
    meta = json.loads((staging / "pipeline.json").read_text())
    for name in meta["files"]:
        if name.split("/")[0] in components:
            meta["files"][name] = hashlib.sha256((staging / name).read_bytes()).hexdigest()
    (staging / "pipeline.json").write_text(json.dumps(meta, indent=2) + "\n")
    staging.rename(out)
    print(f"wrote {out}: {base} with {', '.join(components)} from {donor}")


if __name__ == "__main__":
    main()
