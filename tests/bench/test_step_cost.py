"""The decode-step cost the progressive-port notebook reports: launches are counted as a GPU would make them."""
import torch

from lmdp import kernels
from lmdp.bench.step_cost import count_launches, decode_step_cost


def test_an_lmdp_fused_op_is_one_launch_and_views_are_none():
    x, w = torch.randn(4, 8), torch.ones(8)
    assert count_launches(lambda: kernels.rms_norm(x, w)) == 1          # several torch ops in its CPU reference
    assert count_launches(lambda: (x * 2).view(-1).t() + 1) == 2         # mul, add; the views launch nothing
    unfused = count_launches(lambda: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)))
    assert unfused == 6                                                # pow, mean, add, rsqrt, mul, mul
    assert kernels.rms_norm is not None and count_launches(lambda: kernels.rms_norm(x, w)) == 1   # restored


def test_decode_step_cost_of_the_tiny_llama(tiny_llama):
    from lmdp.engine import ModelAgent
    agent = ModelAgent.from_pretrained(tiny_llama, dtype='float32')
    cost = decode_step_cost(agent, batch=2, prompt_len=5, steps=2)
    assert cost.batch == 2 and cost.ms_per_step > 0
    # three layers of (norm, qkv, rotary+cache write, attention, o_proj, norm, gate_up, down) and the ends
    assert 3 * 8 <= cost.launches_per_step <= 3 * 8 + 40
