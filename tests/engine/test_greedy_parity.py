"""Greedy outputs of the batched engine equal transformers' greedy outputs of each prompt run alone."""
import inspect

import torch

from lmdp import GenerationConfig


@torch.no_grad()
def hf_greedy(model, prompt, max_new_tokens, repetition_penalty=1.0):
    """transformers' greedy continuation of one prompt, through its own KV cache (no eos stop)."""
    from transformers import RepetitionPenaltyLogitsProcessor
    penalty = RepetitionPenaltyLogitsProcessor(repetition_penalty) if repetition_penalty != 1.0 else None
    # transformers 5.2x renamed past_key_values to cache; older ones know only the first
    key = 'cache' if 'cache' in inspect.signature(model.forward).parameters else 'past_key_values'
    out = model(torch.tensor([prompt]), use_cache=True)
    generated = []
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        if penalty is not None:
            logits = penalty(torch.tensor([prompt + generated]), logits)
        token = int(logits.argmax(-1))
        generated.append(token)
        out = model(torch.tensor([[token]]), use_cache=True, **{key: getattr(out, key)})
    return generated


def test_32_prompts_at_once_equal_transformers_alone(pipe, hf2, random_prompts):
    prompts = random_prompts(32, 3, 70, seed=1)
    responses = pipe(prompts, GenerationConfig(max_new_tokens=32, ignore_eos=True))
    assert pipe.engine.stats.prefill_steps >= 1
    for prompt, response in zip(prompts, responses):
        assert response.finish_reason == 'length' and response.input_token_len == len(prompt)
        assert response.token_ids == hf_greedy(hf2, prompt, 32)
    assert pipe.engine.block_manager.num_used == 0


def test_repetition_penalty_matches_transformers(pipe, hf2, random_prompts):
    prompts = random_prompts(4, 5, 30, seed=2)
    responses = pipe(prompts, GenerationConfig(max_new_tokens=12, ignore_eos=True, repetition_penalty=1.5))
    plain = pipe(prompts, GenerationConfig(max_new_tokens=12, ignore_eos=True))
    for prompt, response in zip(prompts, responses):
        assert response.token_ids == hf_greedy(hf2, prompt, 12, repetition_penalty=1.5)
    assert any(r.token_ids != p.token_ids for r, p in zip(responses, plain)), 'the penalty changed nothing'


def test_text_and_chat_prompts_use_the_checkpoint_template(pipe):
    tok = pipe.tokenizer.model
    chat = [{'role': 'user', 'content': 'Why is the sky blue?'}]
    expected = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    by_text = pipe('Why is the sky blue?', GenerationConfig(max_new_tokens=4, ignore_eos=True))
    by_chat = pipe(chat, GenerationConfig(max_new_tokens=4, ignore_eos=True))
    ids = tok.encode(expected, add_special_tokens=False)
    by_ids = pipe(ids, GenerationConfig(max_new_tokens=4, ignore_eos=True))
    assert by_text.token_ids == by_chat.token_ids == by_ids.token_ids
    assert by_text.input_token_len == len(ids) and ids.count(1) == 1   # one <s>, from the template
    raw = pipe('Why is the sky blue?', GenerationConfig(max_new_tokens=4, ignore_eos=True), do_preprocess=False)
    assert raw.input_token_len == len(tok.encode('Why is the sky blue?'))
    assert raw.text == tok.decode(raw.token_ids, skip_special_tokens=True)


def test_get_logits_and_ppl_match_transformers(pipe, hf2, random_prompts):
    prompts = random_prompts(2, 20, 40, seed=3)
    logits = pipe.get_logits(prompts)
    ppl = pipe.get_ppl(prompts)
    for prompt, mine, nll in zip(prompts, logits, ppl):
        with torch.no_grad():
            ref = hf2(torch.tensor([prompt])).logits[0].float()
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4)
        ref_nll = torch.nn.functional.cross_entropy(ref[:-1], torch.tensor(prompt[1:])).item()
        assert abs(nll - ref_nll) < 1e-4
    assert pipe.engine.block_manager.num_used == 0
