"""The lmdp side: load the port with a weight-coverage account, prefill every prompt packed in one step, then
decode through the paged cache (small blocks handed out shuffled, so block tables are not contiguous); on CUDA,
one more decode step eagerly and by CUDA-graph replay (parity/graph_replay.py)."""
import time
from typing import List, Sequence

import torch

from .capture import Recorder
from .capture_set import CaptureSet, PhaseRows
from .taps import Site, TapResolver


def load_port(model_path: str, dtype: torch.dtype, device, custom_module_map=None):
    """(ModelAgent, LoadReport). Weights load non-strictly so that missing ones are reported, not raised; the
    report lists port parameters no checkpoint tensor filled (.missing) and checkpoint tensors that filled
    nothing (.unused)."""
    from lmdp.engine import ModelAgent

    agent = ModelAgent.from_pretrained(model_path, dtype=dtype, device=device, custom_module_map=custom_module_map,
                                       strict=False)
    return agent, agent.load_report


def _split(rows: torch.Tensor, lengths: Sequence[int], tap: str) -> List[torch.Tensor]:
    if rows.size(0) != sum(lengths):
        raise RuntimeError(f'tap {tap}: the port produced {rows.size(0)} rows for a step of {sum(lengths)} packed '
                           'tokens; its module output is not one row per token')
    return list(rows.split(list(lengths)))


def run_port(agent, hf_config, prompts: Sequence[Sequence[int]], tokens: List[List[int]], decode_steps: int,
             taps, block_size: int = 16, overrides=None, progress=None) -> CaptureSet:
    """Captures of every tap; decode is teacher-forced on `tokens` (the reference's greedy choices)."""
    from lmdp.engine import StepRunner

    start = time.perf_counter()
    sites = TapResolver(agent.model, 'port', hf_config, overrides).resolve(taps)
    capture = CaptureSet(missing={t: why for t, why in sites.items() if not isinstance(why, Site)})
    lengths = [len(p) for p in prompts]
    blocks = sum(-(-(n + decode_steps + 1) // block_size) for n in lengths)   # + the graph check's step
    runner = StepRunner(agent, num_blocks=2 * blocks + 2, block_size=block_size, shuffle_blocks_seed=0)
    prefill, decode = PhaseRows(len(prompts)), PhaseRows(len(prompts))
    with Recorder(agent.model, {t: s for t, s in sites.items() if isinstance(s, Site)}) as recorder:
        out = runner.prefill([list(p) for p in prompts], all_logits=True)
        for tap, rows in recorder.take().items():
            for i, part in enumerate(_split(rows, lengths, tap)):
                prefill.add(tap, i, part)
        for i, logits in enumerate(out.all_logits):
            prefill.add('logits', i, logits.float())
        if progress:
            progress.update(1)
        for step in range(decode_steps):
            out = runner.decode(out.seq_ids, [tokens[i][step] for i in range(len(prompts))])
            for tap, rows in recorder.take().items():
                for i, part in enumerate(_split(rows, [1] * len(prompts), tap)):
                    decode.add(tap, i, part)
            for i in range(len(prompts)):
                decode.add('logits', i, out.logits[i:i + 1].float())
            if progress:
                progress.update(1)
    capture.taps = {'prefill': prefill.done(), 'decode': decode.done() if decode_steps else {}}
    capture.seconds = time.perf_counter() - start
    if agent.device.type == 'cuda':   # after the recorder: its hooks must not be captured into the graphs
        from .graph_replay import replay_vs_eager
        if progress:
            progress.stage('CUDA-graph replay vs eager')
        capture.graph_replay = replay_vs_eager(runner, out.seq_ids, [t[decode_steps] for t in tokens])
    runner.release()
    return capture
