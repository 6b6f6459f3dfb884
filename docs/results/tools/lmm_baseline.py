"""The `lmm_no_history` baseline for rule 22's test run: the shipped checkpoint (its UNet, condition
adapter and schedule) with the personalizer of `runs/small21`'s lmm stage, so that the baseline and
Pigeon differ only by what stages 1 and 2 taught the personalizer.

    PYTHONPATH=. python docs/results/tools/lmm_baseline.py SHIPPED LMM_STAGE OUT
"""

import sys

from pigeon.checkpoint import load_checkpoint, save_checkpoint

shipped, lmm_stage, out = sys.argv[1:4]
ckpt = load_checkpoint(shipped)
ckpt.model.personalizer.load_state_dict(load_checkpoint(lmm_stage).model.personalizer.state_dict())
save_checkpoint(ckpt.model, ckpt.tokenizer, out, overwrite=True, storage_dtype="float16")
print(out)
