"""Training recipes of the three trained stages (SASRec, the twin towers, the recommender LM), no Ray.

A recipe owns one stage's model, optimiser and position (epoch / step / batch / re-index rounds) and
exposes ``state_dict()`` / ``load_state_dict()`` as in-memory checkpoint files (``name -> bytes``,
safetensors + JSON, never pickle) and ``fit()``. The executor gives it a :class:`WorkerEnv`: how to
report a checkpoint, where to print progress, which device to use and how to wrap the model for
data-parallel training. ``train.py`` runs recipes inside Ray Train workers (``ray.train.report``,
``prepare_model``); ``pipeline.LocalBackend`` runs them in-process. The pattern follows torchtune's
recipes (setup / train / state dict) over plain torch loops.

Reads the run directory's data/, embeddings/, cf/ and tokenizer/ stages (artifacts.Files).
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import cf, data, distill, dynamic, embeddings, llm, tasks, towers
from .artifacts import Files, RunDir
from .config import TokenizerConfig, TTDSConfig
from .data import Splits
from .errors import ArtifactError
from .sids import SIDTable

log = logging.getLogger("ttds_ray")

Files_ = dict[str, bytes]
#: Checkpoint-internal file names (inside a Ray Train checkpoint, not the run directory).
STATE = "state.json"
WEIGHTS = "model.safetensors"
TRAINABLE = "trainable.safetensors"
TIED = "tied_rows.safetensors"
ITEM_CODES = "item_codes.safetensors"
OPTIMIZER = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"


def _identity(x):
    return x


def _print_progress(stage: str, metrics: dict) -> None:
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                     if not k.startswith(("rec_", "s_", "c_")))
    # to the process's real stdout: in a Ray Train V2 worker, print() to sys.stdout is both teed to the
    # worker's stream and logged through Train's root logger, which showed every line twice on the driver
    print(f"[{stage}] {shown}", file=sys.__stdout__ or sys.stdout, flush=True)


def broadcast_from_rank0(a: np.ndarray) -> np.ndarray:
    """Rank 0's array on every rank of an initialised ``torch.distributed`` group (identity otherwise).

    The re-index rounds are deterministic on every rank; this guards against drift so that all DDP
    workers train on one item index.
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return a
    t = torch.as_tensor(a, dtype=torch.long).contiguous().to(_coll_device())
    dist.broadcast(t, src=0)
    return t.cpu().numpy()


@dataclass
class WorkerEnv:
    """What an executor gives a recipe.

    Attributes:
        report: ``report(metrics, files_or_None)``; files are a checkpoint (``name -> bytes``).
        progress: ``progress(stage, metrics)``: one console line (called on rank 0 only).
        device: where the model trains (the worker's GPU under ``ray.use_gpu``).
        wrap_model: DDP wrapper (``ray.train.torch.prepare_model``); identity in-process.
        rank / world_size: this worker's place in the data-parallel group.
        dataset: ``dataset(name) -> DataFrame``: this worker's shard of the stage's dataset ``name``, read anew
            at each call (once per epoch) and sorted by the dataset's key columns, so the rows and their order
            do not depend on how Ray Data delivered the blocks (``ray.train.get_dataset_shard`` under Ray,
            the whole table in-process; ``pipeline.DatasetSpec``).
        fault: ``fault(stage, step)`` is called after every optimiser step; a test hook that raises once at a
            chosen step to prove resuming (``train.RayBackend(inject_fault=...)``); a no-op otherwise.
    """
    report: Callable[[dict, Files_ | None], None]
    progress: Callable[[str, dict], None] = _print_progress
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrap_model: Callable = _identity
    rank: int = 0
    world_size: int = 1
    dataset: Callable[[str], "pd.DataFrame"] | None = None
    fault: Callable[[str, int], None] = lambda stage, step: None

    def show(self, stage: str, metrics: dict) -> None:
        if self.rank == 0:
            self.progress(stage, metrics)


def state_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """A dict of tensors as safetensors bytes (CPU, contiguous)."""
    from safetensors.torch import save
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def load_state(blob: bytes) -> dict[str, torch.Tensor]:
    """Inverse of :func:`state_bytes` (safetensors: no pickle)."""
    from safetensors.torch import load
    return load(blob)


def optimizer_files(opt: torch.optim.Optimizer, sched=None) -> Files_:
    """An optimiser's (and LR scheduler's) state as checkpoint files: the per-parameter tensors (Adam
    moments, step counts) in safetensors, the rest (param groups, scheduler position) in JSON."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    sched_sd = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"} if sched is not None else None
    meta = {"param_groups": sd["param_groups"], "scalars": scalars, "scheduler": sched_sd}
    return {OPTIMIZER: state_bytes(tensors), OPTIMIZER_META: json.dumps(meta).encode()}


def load_optimizer(opt: torch.optim.Optimizer, files: Files_, sched=None) -> None:
    """Inverse of :func:`optimizer_files` (tensors go to the device of the optimiser's parameters)."""
    meta = json.loads(files[OPTIMIZER_META])
    state: dict[int, dict] = {}
    for key, v in load_state(files[OPTIMIZER]).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if sched is not None and meta["scheduler"] is not None:
        sched.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(opt.param_groups)})


# ----------------------------------------------------------------------------- stage inputs

def load_splits(run: RunDir) -> tuple[data.Prepared, data.Splits]:
    """The prepared dataset and its leave-one-out split (DESIGN §2)."""
    prepared = data.Prepared.load(run.require("data"))
    return prepared, data.split_leave_one_out(prepared.sequences)


def tower_inputs(run: RunDir, tok_cfg: TokenizerConfig) -> dict[str, np.ndarray]:
    """Item and user (semantic, collaborative) inputs of the towers, float32 ``(N, D)`` each; the user side
    from the training history only (DESIGN §1.2). With ``tok_cfg.cf_erase_popularity`` the items' collaborative
    inputs are :func:`item_cf_inputs`'s (popularity direction erased with training-split counts)."""
    prepared, splits = load_splits(run)
    item_s = embeddings.load_npy(run.require("embeddings") / Files.ITEM_TEXT, rows=len(prepared.items))
    cfe = cf.CFEmbeddings.load(run.require("cf"))
    user_s = towers.user_semantic_embeddings(item_s, [s.tolist() for s in splits.train_items])
    return {"item_s": item_s, "item_c": item_cf_inputs(cfe.items, splits, tok_cfg), "user_s": user_s,
            "user_c": cfe.users}


@dataclass
class UserEncoder:
    """A run's user tower over raw histories (DESIGN §1.2–1.3): semantic input = mean item text embedding of the
    history, collaborative input = SASRec's last hidden state over the history's trained items (items at rows
    >= ``len(item_s)``, cold-start additions, have no SASRec embedding and are left out of it)."""
    item_s: np.ndarray          # float32 (N, D_s) item text embeddings
    sasrec: "cf.SASRec"
    tower: "towers.Tower"
    max_len: int                # cf.max_len: SASRec reads the last max_len items

    @classmethod
    def load(cls, run: RunDir, cfg: TTDSConfig, n_items: int) -> "UserEncoder":
        """The run's stages ``embeddings``, ``cf`` and ``tokenizer`` (raises ArtifactError if one is missing)."""
        item_s = embeddings.load_npy(run.require("embeddings") / Files.ITEM_TEXT, rows=n_items)
        sasrec = cf.load_sasrec(run.require("cf"))
        tower = towers.load_tower(run.require("tokenizer") / Files.USER_TOWER, item_s.shape[1], sasrec.hidden,
                                  cfg.tokenizer.user)
        return cls(item_s, sasrec, tower, cfg.cf.max_len)

    def codes(self, histories: list[np.ndarray], added_s: np.ndarray | None = None) -> np.ndarray:
        """User semantic IDs int64 ``(B, L_u)`` of B histories (int item rows, oldest first); ``added_s``: text
        embeddings ``(A, D_s)`` of items at rows N.. (cold-start additions)."""
        item_s = self.item_s if added_s is None or not len(added_s) else np.concatenate([self.item_s, added_s])
        n = len(self.item_s)
        s = towers.user_semantic_embeddings(item_s, [np.asarray(h).tolist() for h in histories])
        c = cf.encode_users(self.sasrec, [np.asarray(h)[np.asarray(h) < n].tolist() for h in histories], self.max_len)
        return towers.encode_codes(self.tower, s, c)[0]

    def prefix_codes(self, train_seqs: list[list[int]], rows: np.ndarray | None = None,
                     batch: int = 4096) -> np.ndarray:
        """IDs ``(P, L_u)`` of every training prefix, in :func:`tasks.prefix_user_rows`'s layout: user u's ID from
        its first k items (1 <= k < len) at row ``off[u] + k - 1`` (``tasks.seqrec_user_ids=prefix``); with
        ``rows`` (int, in [0, P)) only those, ``(len(rows), L_u)``."""
        off = tasks.prefix_user_rows(train_seqs)
        rows = np.arange(off[-1]) if rows is None else np.asarray(rows, dtype=np.int64)
        users = np.searchsorted(off, rows, side="right") - 1
        hist = [np.asarray(train_seqs[u][:r - off[u] + 1], np.int64) for u, r in zip(users.tolist(), rows.tolist())]
        parts = [self.codes(hist[i:i + batch]) for i in range(0, len(hist), batch)]
        return np.concatenate(parts) if parts else np.zeros((0, self.tower.rq.n_levels), np.int64)


def prompt_user_tokens(cfg: TTDSConfig, run: RunDir, vocab, user_codes: np.ndarray, train_seqs: list[list[int]],
                       n_items: int, only: np.ndarray | None = None) -> np.ndarray:
    """The user-token table training samples are rendered with, int64 ``(U [+ P], L_u)``: the tokenizer stage's
    IDs (``user_codes`` ``(U, L_u)``), plus with ``tasks.seqrec_user_ids=prefix`` the P per-prefix IDs of
    :meth:`UserEncoder.prefix_codes` (rows U.., :func:`tasks.prefix_user_rows`). ``only``: table rows >= U to
    compute (e.g. a logged example's); the other per-prefix rows are then -1, not token ids."""
    table = vocab.user_tokens(user_codes)
    if not (cfg.tasks.use_user_sid and cfg.tasks.seqrec_user_ids == "prefix"):
        return table
    t0, n_users = time.time(), len(table)
    enc = UserEncoder.load(run, cfg, n_items)
    if only is None:
        prefix = vocab.user_tokens(enc.prefix_codes(train_seqs))
        log.info("llm: user IDs of %d training prefixes (tasks.seqrec_user_ids=prefix) in %.1f s", len(prefix),
                 time.time() - t0)
        return np.concatenate([table, prefix])
    only = np.unique(np.asarray(only, dtype=np.int64))
    prefix = np.full((int(tasks.prefix_user_rows(train_seqs)[-1]), table.shape[1]), -1, dtype=table.dtype)
    if len(only):
        prefix[only - n_users] = vocab.user_tokens(enc.prefix_codes(train_seqs, only - n_users))
    return np.concatenate([table, prefix])


def item_cf_inputs(items: np.ndarray, splits: Splits, tok_cfg: TokenizerConfig) -> np.ndarray:
    """The item tower's collaborative input from SASRec's item embeddings ``(N, D_c)``: as they are, or with the
    popularity direction erased (``tokenizer.cf_erase_popularity``, :func:`cf.erase_popularity` with the
    training-split counts). Every consumer of the item tower (tokenizer stage, re-index rounds, cold start) uses it."""
    if not tok_cfg.cf_erase_popularity:
        return items
    return cf.erase_popularity(items, data.train_item_counts(splits, len(items)))


def load_sid_tables(run: RunDir) -> tuple[SIDTable, SIDTable]:
    """The tokenizer stage's (item, user) ID tables (the static index, before any re-index round)."""
    d = run.require("tokenizer")
    return SIDTable.load(d / Files.ITEM_SIDS), SIDTable.load(d / Files.USER_SIDS)


def task_context(cfg: TTDSConfig, run: RunDir, tok) -> tasks.TaskContext:
    """Everything the tuning-task builders read: training split, titles, item text (DESIGN §1.5)."""
    prepared, splits = load_splits(run)
    return tasks.TaskContext(train_seqs=[s.tolist() for s in splits.train_items],
                             titles=prepared.items["title"].tolist(), item_text=prepared.items["text"].tolist(),
                             tok=tok, max_history=cfg.data.max_history, use_user_sid=cfg.tasks.use_user_sid)


def build_recommender_lm(cfg: TTDSConfig, run: RunDir):
    """Backbone + tokenizer with semantic-ID tokens, rows initialised per ``llm.sid_init``, wrapped for training.

    Returns:
        ``(model, tokenizer, vocab, base_vocab_size)``; the model is on the CPU.
    """
    prepared, splits = load_splits(run)
    item_t, user_t = load_sid_tables(run)
    tok = llm.load_tokenizer(cfg.llm.backbone)
    base_vocab = len(tok)
    model = llm.build_backbone(cfg.llm, base_vocab, seed=cfg.seed)
    vocab = llm.add_sid_tokens(tok, item_t.n_levels, item_t.codebook_size, user_t.n_levels, user_t.codebook_size)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    if cfg.llm.sid_init == "codebook":
        d = run.require("tokenizer")
        books = [towers.load_tower(d / f).rq.codebooks.detach() for f in (Files.ITEM_TOWER, Files.USER_TOWER)]
        llm.init_sid_rows_from_codebooks(model, vocab, *books, seed=cfg.seed)
    else:
        llm.init_sid_rows(model, tok, vocab, item_t.codes, prepared.items["title"].tolist(), user_t.codes,
                          [s.tolist() for s in splits.train_items])
    model = llm.wrap_for_training(model, cfg.llm, vocab.new_token_ids)
    return model, tok, vocab, base_vocab


def epoch_batches(n_rows: int, n_steps: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """Row indices of every step of one epoch on one worker: int64 ``(n_steps, batch_size)``.

    A permutation of the shard's ``n_rows`` rows seeded by ``(seed, epoch)``, cycled when the shard holds
    fewer than ``n_steps * batch_size`` rows. Every worker of a data-parallel stage runs the same
    ``n_steps`` (DDP's gradient all-reduce hangs when one worker runs out of batches first), whatever the
    size of its shard. A resumed run draws the same order, so it continues from the exact batch.

    Raises:
        ValueError: the shard is empty (fewer samples than workers) or ``n_steps < 1``.
    """
    if n_rows < 1 or n_steps < 1:
        raise ValueError(f"cannot run {n_steps} steps on a shard of {n_rows} rows; use fewer Ray Train workers "
                         "(ray.num_workers) or a smaller batch size for this dataset")
    order = np.random.default_rng([seed, epoch]).permutation(n_rows)
    need = n_steps * batch_size
    if need > n_rows:
        order = np.resize(order, need)        # repeats the permutation from its start
    return order[:need].reshape(n_steps, batch_size)


def _dist_group() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _coll_device() -> torch.device:
    """Where collective tensors must live: the current GPU under nccl, the CPU under gloo."""
    import torch.distributed as dist
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def min_over_workers(n: int) -> int:
    """The smallest ``n`` over the ranks of an initialised ``torch.distributed`` group (``n`` otherwise)."""
    if not _dist_group():
        return n
    import torch.distributed as dist
    t = torch.tensor([n], dtype=torch.long, device=_coll_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def gather_over_workers(n: int) -> list[int]:
    """``n`` of every rank, in rank order (``[n]`` without a process group)."""
    if not _dist_group():
        return [n]
    import torch.distributed as dist
    dev = _coll_device()
    out = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([n], dtype=torch.long, device=dev))
    return [int(t.item()) for t in out]


# ----------------------------------------------------------------------------- SASRec

class SASRecRecipe:
    """SASRec on the training split (DESIGN §1.1), checkpointed about five times per stage.

    Reads its training windows (``cf.window_rows``: columns ``user_idx``, ``win``, ``seq``, ``target``) from
    the dataset ``"train"`` of the worker environment, once per epoch; every worker runs
    ``min over workers(shard rows) // cf.batch_size`` steps per epoch (at least 1; :func:`epoch_batches`),
    and DDP averages the gradients.
    """

    def __init__(self, cfg: TTDSConfig, run: RunDir, env: WorkerEnv):
        self.cfg, self.env = cfg, env
        prepared = data.Prepared.load(run.require("data"))
        torch.manual_seed(cfg.seed)         # the initial weights (the global RNG is seeded at random per process)
        self.base = cf.SASRec.from_config(cfg.cf, len(prepared.items)).to(env.device)
        self.opt = cf.make_optimizer(self.base, cfg.cf)
        self.epoch, self.step = 0, 0

    def state_dict(self) -> Files_:
        """Weights, optimiser state, the last finished epoch and the step count."""
        return {WEIGHTS: state_bytes(self.base.state_dict()),
                STATE: json.dumps({"epoch": self.epoch, "step": self.step}).encode(), **optimizer_files(self.opt)}

    def load_state_dict(self, files: Files_) -> None:
        """Resume after the checkpoint's epoch (``{}``: start from scratch)."""
        if files:
            self.base.load_state_dict(load_state(files[WEIGHTS]))
            load_optimizer(self.opt, files)
            state = json.loads(files[STATE])
            self.epoch, self.step = state["epoch"] + 1, state.get("step", 0)

    def fit(self) -> None:
        cfg, start, bs = self.cfg, self.epoch, self.cfg.cf.batch_size
        model = self.env.wrap_model(self.base)
        torch.manual_seed(cfg.seed + start)
        every = max(1, cfg.cf.epochs // 5)
        for self.epoch in range(start, cfg.cf.epochs):
            rows = self.env.dataset("train")
            seq, target = np.stack(rows["seq"].to_numpy()), np.stack(rows["target"].to_numpy())
            n_steps = max(1, min_over_workers(len(rows)) // bs)
            losses = []
            for idx in epoch_batches(len(rows), n_steps, bs, cfg.seed, self.epoch):
                losses.append(cf.train_step(model, self.opt, {"seq": seq[idx], "target": target[idx]}))
                self.step += 1
                self.env.fault("cf", self.step)
            metrics = {"epoch": self.epoch, "loss": float(np.mean(losses)), "steps": self.step}
            self.env.show("cf", metrics)
            last = self.epoch == cfg.cf.epochs - 1
            if last:
                metrics["steps_per_worker"] = gather_over_workers(self.step)
            self.env.report(metrics, self.state_dict() if self.epoch % every == every - 1 or last else None)


# ----------------------------------------------------------------------------- twin towers

class TokenizerRecipe:
    """The item tower, then the user tower (DESIGN §1.2–1.4), on all entities; one checkpoint at the end
    (``item_tower.safetensors``, ``user_tower.safetensors``, ``history.json``: loss terms per epoch)."""

    def __init__(self, cfg: TTDSConfig, run: RunDir, env: WorkerEnv):
        self.cfg, self.env = cfg, env
        self.x = tower_inputs(run, cfg.tokenizer)

    def fit(self) -> None:
        cfg, files, history = self.cfg, {}, {}
        for name, tcfg in (("item", cfg.tokenizer.item), ("user", cfg.tokenizer.user)):
            every = max(1, cfg.tokenizer.epochs // 10)
            history[name] = {}

            def on_epoch(epoch, terms, name=name):
                for k, v in terms.items():
                    history[name].setdefault(k, []).append(v)
                if epoch % every == every - 1:
                    self.env.show(f"tokenizer/{name}", {"epoch": epoch, **terms})
                    self.env.report({"tower": name, "epoch": epoch, **terms}, None)

            tower = towers.fit_tower(cfg.tokenizer, tcfg, self.x[f"{name}_s"], self.x[f"{name}_c"], seed=cfg.seed,
                                     on_epoch=on_epoch, device=self.env.device)
            files[Files.tower(name)] = towers.tower_bytes(tower)
        files[Files.TOWER_HISTORY] = json.dumps(history).encode()
        self.env.report({"tower": "done"}, files)

    def load_state_dict(self, files: Files_) -> None:
        """The towers train in one piece (seconds to minutes); an interrupted stage starts over."""


# ----------------------------------------------------------------------------- recommender LM

class LLMRecipe:
    """Fine-tuning of the recommender LM on the tuning tasks (DESIGN §1.5), with the dynamic re-indexing
    rounds of DESIGN §1.6 between training segments (none under ``dynamic.static_index``).

    Setup builds the backbone with semantic-ID tokens (:func:`build_recommender_lm`), the optimiser and
    schedule for ``total_steps``, and (when rounds are due) the item tower. :meth:`fit` trains from the
    current position: at every step it first runs a re-index round if one is due
    (:meth:`reindex_round`), then one optimiser step on the next batch (:meth:`train_step`), with the
    batch on the model's device. Checkpoints (trainable weights, item codes, item tower, position,
    losses, round log; plus the saved LM at the end) are reported at every round and epoch end; a
    recipe restored with :meth:`load_state_dict` continues from the exact batch.

    Samples come from the worker environment's datasets ``epoch_0``, ``epoch_1``, ... (columns ``i`` (the key),
    ``ids``, ``resp``; ``pipeline.llm_samples``), one per epoch, read when the epoch starts. Every worker runs
    ``steps_per_epoch`` steps per epoch (:func:`epoch_batches`). Besides rounds and epoch ends, a checkpoint
    is reported every ``ray.checkpoint_every_steps`` steps.

    Args:
        n_epochs: number of sample datasets (epochs).
        total_steps / steps_per_epoch: the step budget per worker (``pipeline.llm_budget``).
        valid_users: when set (sweeps, ``sweep.py``), every epoch but the last reports ``valid_ndcg@10`` etc.
            (:meth:`validate`) on a seeded sample of this many validation users, for early stopping. It
            consumes no random numbers, so the trained model does not depend on it.
    """

    def __init__(self, cfg: TTDSConfig, run: RunDir, env: WorkerEnv, *, n_epochs: int,
                 total_steps: int, steps_per_epoch: int, valid_users: int | None = None):
        self.cfg, self.env, self.n_epochs = cfg, env, n_epochs
        self.valid_users = valid_users
        self.total, self.spe, self.bs = total_steps, steps_per_epoch, cfg.llm.batch_size
        torch.manual_seed(cfg.seed)
        self.base, self.tok, self.vocab, base_vocab = build_recommender_lm(cfg, run)
        llm.check_packing(self.base, cfg.llm)
        self.base.to(env.device)
        setattr(self.base, llm.DECODE_SCORING_ATTR, cfg.llm.loss_vocab)   # validation decodes as trained
        prepared, self.splits = load_splits(run)
        splits = self.splits
        self.item_t, user_t = load_sid_tables(run)
        self.item_codes, self.user_tok = self.item_t.codes, self.vocab.user_tokens(user_t.codes)
        self.item_tok = self.vocab.item_tokens(self.item_codes)
        self.train_seqs = [s.tolist() for s in splits.train_items]
        self.prompt_user_tok = prompt_user_tokens(cfg, run, self.vocab, user_t.codes, self.train_seqs,
                                                  len(prepared.items))
        self.reindex_at = dynamic.reindex_steps(total_steps, cfg.dynamic)
        self.tower, self.x = None, None
        self.moved = np.zeros(0, dtype=np.int64)    # items the last round moved (dynamic.rewarm_steps)
        if self.reindex_at or cfg.llm.align_psa > 0 or cfg.llm.sid_tie:
            self.x = tower_inputs(run, cfg.tokenizer)
            self.tower = towers.load_tower(run.require("tokenizer") / Files.ITEM_TOWER)
        self.tie = None                              # llm.sid_tie: item ID rows = a learned map of the code vectors
        if cfg.llm.sid_tie:
            self.tie = llm.TiedIDRows(self.base, self.vocab.item_token_ids, self.tower.rq.codebooks, seed=cfg.seed)
        self.opt, self.sched = llm.make_optimizer(self.base, cfg.llm, total_steps,
                                                  tuple(self.tie.parameters()) if self.tie is not None else ())
        self.align = None                            # llm.align_psa: the LLM pulled toward the tower's latents
        if cfg.llm.align_psa > 0:
            self.align = llm.IDAlignment(self.vocab.item_token_ids, self.item_codes, self._mapped_latents(),
                                         weight=cfg.llm.align_psa, tau=cfg.llm.align_tau)
        self.title_vecs = (llm.title_vectors(self.base, self.tok, prepared.items["title"].tolist())
                           if cfg.llm.alpha_tok > 0 else None)
        sid_ids = self.vocab.item_token_ids.flatten() if cfg.llm.loss_vocab == "sid" else None
        self.model = env.wrap_model(llm.LMLoss(self.base, sid_ids, cfg.llm.distill_cf, self.align))  # DDP wraps the loss
        self.teacher = (distill.CFTeacher(cf.load_sasrec(run.require("cf")).to(env.device),
                                          cfg.llm.distill_temperature) if cfg.llm.distill_cf > 0 else None)
        self.pieces = tasks.PromptPieces.build(self.tok)
        self.item_names = prepared.items["item_id"].tolist()
        self.meta = {"backbone": cfg.llm.backbone, "finetune": cfg.llm.finetune, "base_vocab_size": base_vocab,
                     "vocab_size": len(self.tok)}
        self.step, self.epoch, self.batch = 0, 0, 0
        self.losses: list[float] = []
        self.rounds: list[dict] = []
        self.resumed_at: list[int] = []     # steps this stage was resumed from (fault tolerance, reported)

    # -------------------------------------------------------------- checkpoints

    def state_dict(self, *, final: bool = False) -> Files_:
        """Checkpoint files; ``final`` adds the saved LM (adapter or model, tokenizer, ``llm_meta.json``)."""
        trainable = {n: p for n, p in self.base.named_parameters() if p.requires_grad}
        out = {TRAINABLE: state_bytes(trainable),
               ITEM_CODES: state_bytes({"codes": torch.as_tensor(self.item_codes)}),
               STATE: json.dumps({"step": self.step, "epoch": self.epoch, "batch": self.batch,
                                  "losses": self.losses, "rounds": self.rounds,
                                  "resumed_at": self.resumed_at}).encode(),
               **optimizer_files(self.opt, self.sched)}
        if self.tower is not None:
            out[Files.ITEM_TOWER] = towers.tower_bytes(self.tower)
        if self.tie is not None:
            out[TIED] = state_bytes(self.tie.state_dict())
        if final:
            with tempfile.TemporaryDirectory() as d:
                llm.save_llm(self.base, self.tok, Path(d), self.meta)
                out.update({str(p.relative_to(d)): p.read_bytes() for p in Path(d).rglob("*") if p.is_file()})
        return out

    def load_state_dict(self, files: Files_) -> None:
        """Restore a checkpoint of :meth:`state_dict` (``{}``: start from scratch).

        Raises:
            ArtifactError: the checkpoint's trainable parameters are not this model's, or it lacks the tied rows
                of llm.sid_tie.
        """
        if not files:
            return
        trainable = {n for n, p in self.base.named_parameters() if p.requires_grad}
        state = load_state(files[TRAINABLE])
        if set(state) != trainable:
            raise ArtifactError("LLM checkpoint does not match the model's trainable parameters "
                                f"({len(set(state) ^ trainable)} names differ)")
        self.base.load_state_dict(state, strict=False)
        meta = json.loads(files[STATE])
        self.step, self.epoch, self.batch = meta["step"], meta["epoch"], meta["batch"]
        self.losses, self.rounds = meta["losses"], meta["rounds"]
        self.resumed_at = meta.get("resumed_at", []) + [self.step]
        self.item_codes = load_state(files[ITEM_CODES])["codes"].numpy()
        self.item_tok = self.vocab.item_tokens(self.item_codes)
        if self.tower is not None and Files.ITEM_TOWER in files:
            self.tower.load_state_dict(load_state(files[Files.ITEM_TOWER]))
        if self.align is not None:
            self.align.update(self.item_codes, self._mapped_latents())
        if self.tie is not None:
            if TIED not in files:
                raise ArtifactError(f"LLM checkpoint has no {TIED}: it was written without llm.sid_tie, this run "
                                    "ties the ID rows; resume with the config that wrote it or start afresh")
            self.tie.load_state_dict(load_state(files[TIED]))
        load_optimizer(self.opt, files, self.sched)

    def _mapped_latents(self) -> torch.Tensor:
        """float32 ``(N, D)``: the current item tower's latents μ of every item through :func:`llm.latent_map`
        (the map of ``llm.sid_init=codebook``, same seed), for :class:`llm.IDAlignment`."""
        z = self.tower.latent(torch.as_tensor(self.x["item_s"]), torch.as_tensor(self.x["item_c"])).float()
        dim = self.base.get_input_embeddings().weight.shape[1]
        return z @ llm.latent_map(z.shape[1], dim, seed=self.cfg.seed).T

    def _checkpoint(self, final: bool, metrics: dict) -> None:
        self.env.report(metrics, self.state_dict(final=final))

    # -------------------------------------------------------------- the two kinds of step

    def prefix_off(self) -> np.ndarray | None:
        """:func:`tasks.prefix_user_rows` when seqrec prompts carry per-prefix user IDs (``tasks.seqrec_user_ids``),
        so a round's guidance and gate prompts carry the same IDs as training; else None (the stored IDs)."""
        cfg = self.cfg.tasks
        return tasks.prefix_user_rows(self.train_seqs) if cfg.use_user_sid and cfg.seqrec_user_ids == "prefix" else None

    def round_due(self) -> bool:
        return len(self.rounds) < len(self.reindex_at) and self.step >= self.reindex_at[len(self.rounds)]

    def reindex_round(self) -> dict:
        """One tokenizer step + re-index with the LLM frozen (DESIGN §1.6; ``dynamic.run_round``): the item
        tower is refined under the LLM's guidance on seeded seqrec prompts and every item gets its new
        unique semantic ID. Returns the round's stats (``changed``, collisions, wall seconds)."""
        cfg, r = self.cfg, len(self.rounds)
        prefix_off = self.prefix_off()
        users, hist, tgt = dynamic.guidance_prompts(self.train_seqs, cfg.dynamic.guide_samples,
                                                    max_history=cfg.data.max_history, seed=cfg.seed + 1000 + r,
                                                    prefix_off=prefix_off)
        def render(histories: list[list[int]], user_rows: np.ndarray) -> list[list[int]]:
            return tasks.build_eval_prompts(histories, self.item_tok, self.prompt_user_tok[user_rows], self.pieces,
                                            cfg.tasks, max_history=cfg.data.max_history, max_length=cfg.llm.max_length)

        prompts = render(hist, users)
        gate = None
        if cfg.dynamic.accept == "llm":
            gate = dynamic.GateInputs(self.train_seqs, render, self.vocab.item_token_ids,
                                      self.vocab.item_token_ids.flatten() if cfg.llm.loss_vocab == "sid" else None,
                                      cfg.data.max_history, prefix_off)
        res = dynamic.run_round(self.base, self.tower, SIDTable(self.item_codes, self.item_t.codebook_size),
                                prompts=prompts, targets=tgt, pad_id=self.tok.pad_token_id,
                                level1_token_ids=self.vocab.item_token_ids[0], item_s=self.x["item_s"],
                                item_c=self.x["item_c"], tok_cfg=cfg.tokenizer, dyn_cfg=cfg.dynamic,
                                seed=cfg.seed + r, item_names=self.item_names, gate=gate)
        old_codes = self.item_codes
        self.tower, self.item_codes = res.tower, broadcast_from_rank0(res.table.codes)
        self.item_tok = self.vocab.item_tokens(self.item_codes)
        self.moved = dynamic.moved_items(old_codes, self.item_codes)
        if self.align is not None:
            self.align.update(self.item_codes, self._mapped_latents())
        if self.tie is not None:
            self.tie.set_codebooks(self.tower.rq.codebooks)
        stats = {"round": r + 1, "step": self.step, "attempt": len(self.resumed_at), **res.stats}
        self.rounds.append(stats)
        return stats

    def rewarm(self, ids: np.ndarray, resp: np.ndarray) -> dict:
        """``dynamic.rewarm_steps`` optimiser steps, right after a round, on the epoch's samples that learn the ID of
        an item the round moved (:func:`dynamic.rewarm_batches`), with the loss on the moved items' IDs only
        (:func:`dynamic.moved_only_loss`); they count toward the step budget. Returns
        ``{"rewarm_steps", "rewarm_pool", "rewarm_loss"}`` for the round's log (``{}`` when off or nothing moved)."""
        n = min(self.cfg.dynamic.rewarm_steps, self.total - self.step)
        if n <= 0 or len(self.moved) == 0:
            return {}
        batches, pool = dynamic.rewarm_batches(ids, resp, self.moved, steps=n, batch_size=self.bs,
                                               seed=self.cfg.seed + 1000 * len(self.rounds) + self.env.rank)
        losses = [self.train_step([{"ids": ids[j], "resp": dynamic.moved_only_loss(ids[j], resp[j], self.moved)}
                                   for j in idx]) for idx in batches]
        return {"rewarm_steps": len(losses), "rewarm_pool": pool,
                "rewarm_loss": round(float(np.mean(losses)), 4) if losses else None}

    @torch.inference_mode()
    def validate(self) -> dict[str, float]:
        """``{"valid_hr@k", "valid_ndcg@k"}`` for ``eval.ks`` on the validation split (never test), with the model
        and item index as they are now: the eval prompts and trie-constrained beam search of ``ttds-ray
        evaluate --split valid``, on the same seeded sample of ``valid_users`` users (``evaluate.select_eval_users``)."""
        from .decoding import SIDTrie
        from .evaluate import TTDSRanker, eval_histories, select_eval_users, targets_of
        from .metrics import hr_ndcg, target_ranks

        cfg, sp = self.cfg, self.splits
        rows = select_eval_users(len(sp), self.valid_users, cfg.seed)
        hist = eval_histories(sp, rows, "valid", cfg.data.max_history)
        user_tok = self.user_tok[sp.user_idx[rows]] if cfg.tasks.use_user_sid else None
        prompts = tasks.build_eval_prompts([h.tolist() for h in hist], self.item_tok, user_tok, self.pieces, cfg.tasks,
                                           max_history=cfg.data.max_history, max_length=cfg.llm.max_length)
        trie = SIDTrie(self.item_codes, self.vocab.item_token_ids).to(llm.model_device(self.base))
        was_training = self.base.training
        self.base.eval()
        try:
            ranked, scores = TTDSRanker(self.base, trie, self.tok.pad_token_id, cfg.eval.n_beams,
                                        cfg.llm.max_length).rank_with_scores(prompts, cfg.eval.batch_size)
        finally:
            self.base.train(was_training)
        m = hr_ndcg(target_ranks(ranked, targets_of(sp, rows, "valid"), scores=scores), ks=cfg.eval.ks)
        return {f"valid_{k.lower()}": float(v) for k, v in m.items() if "@" in k}

    def _aux_loss(self):
        """The token-grain alignment term (DESIGN §1.4, weight ``llm.alpha_tok``) on a random item batch,
        drawn from a generator seeded by (seed, step), so a resumed run draws what the original would."""
        if self.title_vecs is None:
            return None
        rng = np.random.default_rng([self.cfg.seed, self.step, 1])
        n = len(self.item_codes)
        items = rng.choice(n, size=min(self.bs, n), replace=False)
        dev = llm.model_device(self.base)
        ids = torch.as_tensor(self.item_tok[items]).to(dev)
        vecs = self.title_vecs[torch.as_tensor(items)].to(dev)
        return lambda: self.cfg.llm.alpha_tok * llm.token_alignment_loss(self.base, ids, vecs)

    def train_step(self, rows: list[dict]) -> float:
        """One optimiser step on ``rows`` rendered with the current item index; the batch goes to the
        model's device inside ``llm.train_step``. Returns the LM loss (nats/token)."""
        to_batch = tasks.pack if self.cfg.llm.pack else tasks.collate
        rendered = tasks.render_batch(rows, self.item_tok, self.prompt_user_tok)
        teacher = None
        if self.teacher is not None:   # SASRec's soft targets on the seqrec items (llm.distill_cf)
            teacher = self.teacher.attach(rows, rendered, self.item_codes, self.item_t.codebook_size,
                                          self.user_tok.shape[1])
        b = to_batch(rendered, self.tok.pad_token_id, self.cfg.llm.max_length)
        if teacher is not None:
            b["teacher"] = teacher
        loss = llm.train_step(self.model, self.opt, self.sched, b, aux_loss=self._aux_loss(), tie=self.tie)
        self.losses.append(loss)
        self.step += 1
        return loss

    # -------------------------------------------------------------- the loop

    def fit(self) -> None:
        """Train from the current position to ``total_steps`` (or the last epoch of samples)."""
        cfg, bs, every = self.cfg, self.bs, self.cfg.ray.checkpoint_every_steps
        t_start, start_step = time.time(), self.step
        epoch0, batch0 = self.epoch, self.batch
        for epoch in range(epoch0, self.n_epochs):
            self.epoch = epoch
            ep = self.env.dataset(f"epoch_{epoch}")
            ids, resp = ep["ids"].to_numpy(), ep["resp"].to_numpy()
            ep_losses = []
            for i, idx in enumerate(epoch_batches(len(ep), self.spe, bs, cfg.seed, epoch)):
                if i < (batch0 if epoch == epoch0 else 0):
                    continue
                self.batch = i
                if self.round_due():
                    st = self.reindex_round()
                    st.update(self.rewarm(ids, resp))     # the same dict as the round log's entry
                    self.env.show("llm/reindex", {k: st[k] for k in ("round", "step", "changed", "wall_s")})
                    self._checkpoint(False, {"epoch": epoch, "step": self.step, "round": st["round"]})
                if self.step >= self.total:              # re-warming after a round may have spent the budget
                    break
                ep_losses.append(self.train_step([{"ids": ids[j], "resp": resp[j]} for j in idx]))
                if self.step % 50 == 0:
                    self.env.show("llm", {"epoch": epoch, "step": f"{self.step}/{self.total}",
                                          "loss": float(np.mean(self.losses[-50:])),
                                          "sec_per_step": round((time.time() - t_start) / (self.step - start_step), 3)})
                if self.step >= self.total:
                    break
                if every and self.step % every == 0 and i + 1 < self.spe:     # mid-epoch: resume at the next batch
                    self.batch = i + 1
                    self._checkpoint(False, {"epoch": epoch, "step": self.step})
                self.env.fault("llm", self.step)
            done = self.step >= self.total or epoch == self.n_epochs - 1
            self.epoch, self.batch = epoch + 1, 0
            metrics = {"epoch": epoch, "step": self.step, "loss": float(np.mean(ep_losses)) if ep_losses else None}
            if self.valid_users and not done and self.env.rank == 0:   # the last epoch: the sweep evaluates the saved LM
                metrics.update(self.validate())
                self.env.show("llm/valid", metrics)
            if done:
                metrics["steps_per_worker"] = gather_over_workers(self.step)
                # this attempt's training throughput on this worker (rounds and validation included)
                metrics["samples_per_s"] = (self.step - start_step) * bs / max(time.time() - t_start, 1e-9)
            self._checkpoint(done, metrics)
            if done:
                break


#: stage -> recipe class; the executor builds ``RECIPES[stage](cfg, run, env, **extra)``.
RECIPES = {"cf": SASRecRecipe, "tokenizer": TokenizerRecipe, "llm": LLMRecipe}
