"""The `lmm_no_history` baseline built on a shipped checkpoint: its UNet, condition adapter, tokenizer
and schedule with a personalizer that only the lmm stage (stage 0, text to image tokens) trained, so
that the baseline and Pigeon differ only by what stages 1 and 2 taught the personalizer.

    PYTHONPATH=. python docs/results/tools/lmm_baseline.py fresh SHIPPED OUT
        the shipped checkpoint with the personalizer a fresh run draws (seed 0), to start the lmm
        stage from: pigeon train lmm ... --init OUT
    PYTHONPATH=. python docs/results/tools/lmm_baseline.py swap SHIPPED LMM_STAGE OUT
        the shipped checkpoint with the lmm stage's personalizer (float16, like the shipped one)
"""

import sys

from pigeon.checkpoint import load_checkpoint, save_checkpoint
from pigeon.training.loop import fresh_model

mode, shipped, *rest = sys.argv[1:]
ckpt = load_checkpoint(shipped)
if mode == "fresh":
    (out,) = rest
    personalizer = fresh_model(ckpt.model.config).personalizer
    dtype = "float32"
elif mode == "swap":
    lmm_stage, out = rest
    personalizer = load_checkpoint(lmm_stage).model.personalizer
    dtype = "float16"
else:
    raise SystemExit(f"mode {mode!r} is neither 'fresh' nor 'swap'")
ckpt.model.personalizer.load_state_dict(personalizer.state_dict())
save_checkpoint(ckpt.model, ckpt.tokenizer, out, overwrite=True, storage_dtype=dtype)
print(out)
