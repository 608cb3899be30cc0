"""The lmdp side: load the port with a weight-coverage account, prefill every prompt packed in one step, then
decode through the paged cache (small blocks handed out shuffled, so block tables are not contiguous); on CUDA,
one more decode step eagerly and by CUDA-graph replay (parity/graph_replay.py)."""
import time
from collections.abc import Sequence

import torch

from .capture import LocalInputs
from .capture_set import CaptureSet, PhaseRows
from .local import boundary_taps, call_values
from .reference import recorder_for


def load_port(model_path: str, dtype: torch.dtype, device, custom_module_map=None):
    """(ModelAgent, LoadReport). Weights load non-strictly so that missing ones are reported, not raised; the
    report lists port parameters no checkpoint tensor filled (.missing) and checkpoint tensors that filled
    nothing (.unused)."""
    from lmdp.engine import ModelAgent

    agent = ModelAgent.from_pretrained(model_path, dtype=dtype, device=device, custom_module_map=custom_module_map,
                                       strict=False)
    return agent, agent.load_report


def _split(rows: torch.Tensor, lengths: Sequence[int], tap: str) -> list[torch.Tensor]:
    if rows.size(0) != sum(lengths):
        raise RuntimeError(f'tap {tap}: the port produced {rows.size(0)} rows for a step of {sum(lengths)} packed '
                           'tokens; its module output is not one row per token')
    return list(rows.split(list(lengths)))


def run_port(agent, hf_config, prompts: Sequence[Sequence[int]], tokens: list[list[int]], decode_steps: int,
             taps, block_size: int = 16, overrides=None, progress=None, truth: CaptureSet | None = None,
             graph_check: bool = True) -> CaptureSet:
    """Captures of every tap; decode is teacher-forced on `tokens` (the reference's greedy choices). With `truth`,
    every layer starts from the truth's stream (the layer-local view). The steps are the engine's own
    (`lmdp.engine.StepRunner` over `ModelRunner`): its packing, block tables and sampler."""
    from lmdp.engine import StepRunner

    start = time.perf_counter()
    local = LocalInputs() if truth is not None else None
    sources = boundary_taps(taps) if truth is not None else {}
    recorder, capture = recorder_for(agent.model, 'port', hf_config, taps, overrides, local)
    lengths = [len(p) for p in prompts]
    seqs = list(range(len(prompts)))
    blocks = sum(-(-(n + decode_steps + 1) // block_size) for n in lengths)   # + the graph check's step
    runner = StepRunner(agent, num_blocks=2 * blocks + 2, block_size=block_size, shuffle_blocks_seed=0)
    prefill, decode = PhaseRows(len(prompts)), PhaseRows(len(prompts))
    port_tokens = [[] for _ in prompts]
    with recorder:
        if local is not None:
            local.set(call_values(truth, sources, 'prefill', seqs, device=agent.device))
        recorder.expect(sum(lengths))
        out = runner.prefill([list(p) for p in prompts], all_logits=True)
        for tap, rows in recorder.take().items():
            for i, part in enumerate(_split(rows, lengths, tap)):
                prefill.add(tap, i, part)
        for i, logits in enumerate(out.all_logits):
            prefill.add('logits', i, logits.float())
        for i, t in enumerate(out.tokens):
            port_tokens[i].append(t)
        if progress:
            progress.update(1)
        for step in range(decode_steps):
            if local is not None:
                local.set(call_values(truth, sources, 'decode', seqs, step, device=agent.device))
            recorder.expect(len(prompts))
            out = runner.decode(out.seq_ids, [tokens[i][step] for i in range(len(prompts))])
            for tap, rows in recorder.take().items():
                for i, part in enumerate(_split(rows, [1] * len(prompts), tap)):
                    decode.add(tap, i, part)
            for i in range(len(prompts)):
                decode.add('logits', i, out.logits[i:i + 1].float())
                port_tokens[i].append(out.tokens[i])
            if progress:
                progress.update(1)
    capture.taps = {'prefill': prefill.done(), 'decode': decode.done() if decode_steps else {}}
    capture.sampled_tokens = port_tokens
    capture.seconds = time.perf_counter() - start
    if graph_check and agent.device.type == 'cuda':   # after the recorder: its hooks must not be captured
        from .graph_replay import replay_vs_eager
        if progress:
            progress.stage('CUDA-graph replay vs eager')
        capture.graph_replay = replay_vs_eager(runner, out.seq_ids, [t[decode_steps] for t in tokens])
    runner.release()
    return capture
