"""Device contract (issue 8 item 3): every stage's training step and the beam search put their inputs on
the model's device. This machine has no GPU, so the model is put on PyTorch's ``meta`` device: a forward
pre-hook on every module checks that each input tensor is on the model's device and then stops the step.
A batch left on the CPU trips the check (AssertionError) instead of reaching the stop."""
import numpy as np
import pytest
import torch

from ttds_ray import cf, llm, towers
from ttds_ray.config import CFConfig, LLMConfig, TokenizerConfig, TowerConfig
from ttds_ray.decoding import SIDTrie
from ttds_ray.evaluate import TTDSRanker

META = torch.device("meta")


class Reached(Exception):
    """The model's forward was reached with every input on the model's device."""


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def _guard(model: torch.nn.Module) -> torch.nn.Module:
    def hook(module, args, kwargs):
        bad = [t.device for t in _tensors((args, kwargs)) if t.device != META]
        assert not bad, f"{type(module).__name__} got inputs on {bad[:3]}, model is on {META}"
        raise Reached
    for m in model.modules():
        m.register_forward_pre_hook(hook, with_kwargs=True)
    return model


def _tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def test_sasrec_step_moves_the_batch_to_the_model_device():
    model = _guard(cf.SASRec.from_config(CFConfig(hidden=8, n_layers=1), n_items=10).to(META))
    batch = {"seq": torch.tensor([[1, 2, 3]]), "target": torch.tensor([[2, 3, 4]])}
    with pytest.raises(Reached):
        cf.train_step(model, cf.make_optimizer(model, CFConfig()), batch)


def test_llm_step_moves_the_batch_to_the_model_device():
    model = _guard(_tiny_lm().to(META))
    opt, sched = llm.make_optimizer(model, LLMConfig(), total_steps=4)
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "labels": torch.tensor([[-100, -100, 3, 4]])}
    with pytest.raises(Reached):
        llm.train_step(model, opt, sched, batch)


def test_tower_fit_moves_its_inputs_to_the_device(monkeypatch):
    real_init = towers.Tower.__init__

    def guarded_init(self, *a, **k):
        real_init(self, *a, **k)
        _guard(self.vae)
    monkeypatch.setattr(towers.Tower, "__init__", guarded_init)
    rng = np.random.default_rng(0)
    s, c = rng.normal(size=(8, 6)).astype(np.float32), rng.normal(size=(8, 4)).astype(np.float32)
    tcfg = TowerConfig(n_levels=2, codebook_size=4, latent_dim=4, hidden_dim=8)
    with pytest.raises(Reached):
        towers.fit_tower(TokenizerConfig(epochs=2, batch_size=4), tcfg, s, c, seed=0, device=META)


def test_beam_search_runs_on_the_model_device():
    model = _guard(_tiny_lm().to(META))
    codes = np.array([[0, 1], [1, 0], [1, 1]])
    trie = SIDTrie(codes, torch.arange(8, 16).view(2, 4))
    ranker = TTDSRanker(model, trie, pad_id=0, n_beams=2, max_length=16)
    with pytest.raises(Reached):
        ranker.rank([[1, 2, 3], [4, 5]], batch_size=2)
