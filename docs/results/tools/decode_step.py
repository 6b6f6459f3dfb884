"""The personalizer's call time per artifact folder, intra-op thread count and spinning, at a decode
step (one token after the opt-sized cache, batch 1) and at the prefill (opt tokens, batch 1), side by
side, median of 40 round-robin calls (benchmarks/README.md, "The fast variant").

    PYTHONPATH=. python docs/results/tools/decode_step.py CHECKPOINT FOLDER [FOLDER ...]
"""

import itertools
import sys
import time

import numpy as np
import onnxruntime as ort

from pigeon.checkpoint import load_config
from pigeon.specs import component_specs, sample_inputs

config = load_config(sys.argv[1])
spec = component_specs(config)["personalizer"]
sessions = {}
for folder, threads, spinning in itertools.product(sys.argv[2:], (1, 2), ("0", "1")):
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    sessions[(folder, threads, spinning)] = ort.InferenceSession(
        f"{folder}/personalizer/model.onnx", options, providers=["CPUExecutionProvider"]
    )
for point, values in {"decode step": {"seq": 1, "batch": 1}, "prefill": {"batch": 1}}.items():
    feeds = sample_inputs(spec, config, values)
    for session in sessions.values():  # warm-up
        session.run(None, feeds)
    seconds = {key: [] for key in sessions}
    for _ in range(40):
        for key, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            seconds[key].append(time.perf_counter() - start)
    print(
        f"{point}: input_ids {feeds['input_ids'].shape}, attention_mask {feeds['attention_mask'].shape}"
    )
    for (folder, threads, spinning), s in seconds.items():
        print(
            f"    {folder}, {threads} thread(s), spinning {spinning}: {np.median(s) * 1e3:.2f} ms"
        )
