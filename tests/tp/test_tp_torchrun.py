"""The same tensor-parallel engine under torchrun (env:// initialisation, how it spans hosts): rank 0 runs the
pipeline, the other ranks serve it from inside pipeline(), and greedy outputs equal tp=1."""
import json
import os
import subprocess
import sys

from tp_helpers import make_pipe, random_prompts

from lmdp import GenerationConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def test_torchrun_two_ranks_generate_what_one_process_does(tiny_llama2, tmp_path):
    prompts = random_prompts(6, 3, 40, seed=4)
    (tmp_path / 'prompts.json').write_text(json.dumps(prompts))
    out = tmp_path / 'out.json'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2',
           os.path.join(HERE, 'torchrun_generate.py'), tiny_llama2, str(out), str(tmp_path / 'prompts.json')]
    # its own session, so a timeout can end torchrun and both ranks together
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, log[-3000:]
    result = json.loads(out.read_text())
    assert result['rank'] == 0          # only rank 0 gets past pipeline(); the others end inside it
    with make_pipe(tiny_llama2) as pipe:
        single = [r.token_ids for r in pipe(prompts, GenerationConfig(max_new_tokens=8, ignore_eos=True))]
    assert result['tokens'] == single
