"""Run under `torchrun --nproc-per-node N torchrun_generate.py MODEL OUT.json PROMPTS.json`: every rank runs this
script; pipeline() serves rank 0's steps on the others, and rank 0 writes the greedy token ids to OUT.json."""
import json
import os
import sys

import torch

from lmdp import GenerationConfig, PytorchEngineConfig, pipeline

if __name__ == '__main__':
    torch.set_num_threads(1)
    model, out, prompts = sys.argv[1:4]
    with open(prompts) as f:
        prompts = json.load(f)
    config = PytorchEngineConfig(device_type='cpu', dtype='float32', tp=int(os.environ['WORLD_SIZE']))
    with pipeline(model, backend_config=config) as pipe:      # ranks other than 0 serve here, then exit
        responses = pipe(prompts, GenerationConfig(max_new_tokens=8, ignore_eos=True))
    with open(out, 'w') as f:
        json.dump(dict(rank=int(os.environ['RANK']), tokens=[r.token_ids for r in responses]), f)
