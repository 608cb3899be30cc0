"""Functions the tests run on every rank (lmdp.engine.tp.spmd.run_on_ranks): they must live in an importable
module, since the other ranks import them by name."""


def parameter_bytes(model_path: str) -> dict:
    """{parameter name: bytes} of this rank's model, loaded from the checkpoint (tied weights counted once)."""
    from lmdp.engine import ModelAgent
    agent = ModelAgent.from_pretrained(model_path, dtype='float32', device='cpu')
    return {name: p.numel() * p.element_size() for name, p in agent.model.named_parameters()}
