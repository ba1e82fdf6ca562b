"""Ray layer of the main job: every stage of DESIGN §3 on Ray Data / Ray Train, in data-flow order.

Reads a :class:`TTDSConfig`; writes the run directory ``<output_dir>/<name>/`` (artifacts.py
contract): data/ -> embeddings/ -> cf/ -> tokenizer/ -> llm/ -> eval/. Stages already finished
with the same config are skipped; an interrupted stage resumes from its last Ray Train checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from . import cf, data, dynamic, embeddings, evaluate, llm, tasks, towers
from .plots import plot_code_usage, plot_curve, plot_terms
from .artifacts import RunDir, atomic_write_bytes, read_json, write_json
from .config import ConfigError, TTDSConfig, config_from_dict

log = logging.getLogger("ttds_ray")

#: Environment every Ray process gets: no token auth on local clusters (Ray 2.60 default), no usage stats, the
#: V1 parquet reader (V2 spawns a reader actor per pass: seconds on 2 cores), no hub access.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_USE_DATASOURCE_V2": "0",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_V2_ENABLED": "1"}


# ----------------------------------------------------------------------------- Ray session

def init_ray(cfg: TTDSConfig) -> None:
    """Connect to ``ray.address`` / ``RAY_ADDRESS`` if given (e.g. under ``ray job submit``), else
    start an embedded local cluster. Idempotent."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return
    addr = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {k: os.environ[k] for k in RAY_ENV}}
    if addr:  # a running cluster (e.g. inside `ray job submit`): keep the job's own runtime_env
        ray.init(address=addr)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=True, runtime_env=env)


def _device(cfg: TTDSConfig) -> torch.device:
    """The worker's device: its GPU under ``ray.use_gpu`` (Ray Train assigns one per worker), else the CPU."""
    return ray.train.torch.get_device() if cfg.ray.use_gpu else torch.device("cpu")


def _threads(cfg: TTDSConfig) -> None:
    torch.set_num_threads(cfg.ray.torch_threads or os.cpu_count() or 1)


def _trainer(loop, cfg: TTDSConfig, run: RunDir, stage: str, *, num_workers: int | None = None,
             datasets: dict | None = None, extra: dict | None = None) -> TorchTrainer:
    loop_config = {"cfg": cfg.to_dict(), "run_dir": str(run.root.resolve()), **(extra or {})}
    return TorchTrainer(
        loop, train_loop_config=loop_config, datasets=datasets,
        scaling_config=ScalingConfig(num_workers=num_workers or cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(name=f"{stage}-{cfg.stage_hash(stage)}", storage_path=str((run.root / "ray_results").resolve()),
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))


def _progress(stage: str, metrics: dict) -> None:
    """One progress line from rank 0 (reaches the driver's console through Ray's log forwarding)."""
    if ray.train.get_context().get_world_rank() == 0:
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                         if not k.startswith(("rec_", "s_", "c_")))
        print(f"[{stage}] {shown}", flush=True)


def _report(metrics: dict, files: dict[str, bytes] | None = None) -> None:
    """ray.train.report with an optional checkpoint made of in-memory files (rank 0 only)."""
    if files and ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as d:
            for name, blob in files.items():
                Path(d, name).parent.mkdir(parents=True, exist_ok=True)
                Path(d, name).write_bytes(blob)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


def _ckpt_files(ckpt: Checkpoint | None) -> dict[str, bytes]:
    if ckpt is None:
        return {}
    with ckpt.as_directory() as d:
        return {str(p.relative_to(d)): p.read_bytes() for p in Path(d).rglob("*") if p.is_file()}


def _state_bytes(obj: dict) -> bytes:
    from safetensors.torch import save
    return save({k: v.detach().contiguous() for k, v in obj.items()})


def _load_state(blob: bytes) -> dict:
    from safetensors.torch import load
    return load(blob)


def _splits(run: RunDir) -> tuple[data.Prepared, data.Splits]:
    prepared = data.Prepared.load(run.require("data"))
    return prepared, data.split_leave_one_out(prepared.sequences)


# ----------------------------------------------------------------------------- stage: data (Ray Data)

def stage_data(cfg: TTDSConfig, run: RunDir) -> None:
    """Read the raw log (validated), normalise it through Ray Data, k-core + remap, save parquet."""
    raw = data.read_raw(cfg.data)
    ds = ray.data.from_pandas(raw.interactions).map_batches(data.normalize_interactions_batch,
                                                            batch_format="pandas")
    inter = ds.to_pandas()
    prepared = data.prepare(dataclasses.replace(raw, interactions=inter), kcore=cfg.data.kcore, seed=cfg.seed)
    with run.write_stage("data", config_hash=cfg.stage_hash("data"), numbers=dict(prepared.stats)) as (d, _):
        prepared.save(d)
    log.info("data: %s", json.dumps(prepared.stats))


# ----------------------------------------------------------------------------- stage: embeddings

class _TextEncoderUDF:
    """Ray Data callable class: item text -> semantic embeddings with the configured encoder."""

    def __init__(self, ecfg: dict):
        from .config import EmbeddingsConfig
        self.cfg = EmbeddingsConfig(**ecfg)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        texts = batch["text"].tolist()
        if self.cfg.text_encoder == "llm":
            emb = llm.encode_texts_llm(self.cfg.llm_backbone, [t[:self.cfg.max_text_chars] for t in texts],
                                       max_tokens=self.cfg.llm_max_tokens)
        else:
            emb = embeddings.encode_texts(texts, batch_size=self.cfg.batch_size, max_chars=self.cfg.max_text_chars)
        return pd.DataFrame({"item_idx": batch["item_idx"].to_numpy(), "emb": list(emb)})


def stage_embeddings(cfg: TTDSConfig, run: RunDir) -> None:
    """Item text -> semantic embeddings (all-MiniLM-L6-v2, or the backbone LLM's mean-pooled hidden
    states), batch inference with Ray Data map_batches."""
    prepared = data.Prepared.load(run.require("data"))
    ds = ray.data.from_pandas(prepared.items[["item_idx", "text"]])
    out = ds.map_batches(_TextEncoderUDF, fn_constructor_args=(cfg.embeddings.model_dump(),),
                         batch_size=1024, batch_format="pandas", concurrency=1).to_pandas()
    out = out.sort_values("item_idx")
    emb = np.stack(out["emb"].to_numpy()).astype(np.float32)
    assert emb.shape[0] == len(prepared.items)
    with run.write_stage("embeddings", config_hash=cfg.stage_hash("embeddings"),
                         numbers={"shape": list(emb.shape), "text_encoder": cfg.embeddings.text_encoder}) as (d, _):
        embeddings.save_npy(d / "item_text.npy", emb)


# ----------------------------------------------------------------------------- stage: cf (SASRec)

def _cf_loop(config: dict) -> None:
    """Ray Train worker: SASRec on the training split, checkpointed every few epochs."""
    cfg = config_from_dict(config["cfg"])
    _threads(cfg)
    run = RunDir(config["run_dir"])
    prepared, splits = _splits(run)
    n_items = len(prepared.items)
    ctx = ray.train.get_context()
    seqs = [s.tolist() for s in splits.train_items[ctx.get_world_rank()::ctx.get_world_size()]]
    model = cf.SASRec.from_config(cfg.cf, n_items)
    opt = cf.make_optimizer(model, cfg.cf)
    start = 0
    files = _ckpt_files(ray.train.get_checkpoint())
    if files:
        model.load_state_dict(_load_state(files["model.safetensors"]))
        start = json.loads(files["state.json"])["epoch"] + 1
    model = ray.train.torch.prepare_model(model)
    rng = np.random.default_rng([cfg.seed, start])
    every = max(1, cfg.cf.epochs // 5)
    torch.manual_seed(cfg.seed + start)
    for epoch in range(start, cfg.cf.epochs):
        losses = [cf.train_step(model, opt, b) for b in
                  cf.make_training_batches(seqs, cfg.cf.max_len, cfg.cf.batch_size, rng,
                                               stride=cfg.cf.window_stride)]
        metrics = {"epoch": epoch, "loss": float(np.mean(losses))}
        _progress("cf", metrics)
        if epoch % every == every - 1 or epoch == cfg.cf.epochs - 1:
            base = getattr(model, "module", model)
            _report(metrics, {"model.safetensors": _state_bytes(base.state_dict()),
                              "state.json": json.dumps({"epoch": epoch}).encode()})
        else:
            _report(metrics)


def stage_cf(cfg: TTDSConfig, run: RunDir) -> None:
    """Train SASRec as a Ray Train job; save weights + item/user collaborative embeddings."""
    prepared, splits = _splits(run)
    result = _trainer(_cf_loop, cfg, run, "cf").fit()
    model = cf.SASRec.from_config(cfg.cf, len(prepared.items))
    model.load_state_dict(_load_state(_ckpt_files(result.checkpoint)["model.safetensors"]))
    model.eval()
    train_seqs = [s.tolist() for s in splits.train_items]
    emb = cf.cf_embeddings(model, train_seqs)
    with run.write_stage("cf", config_hash=cfg.stage_hash("cf"), numbers={"final_loss": result.metrics.get("loss")}) as (d, _):
        cf.save_sasrec(model, cfg.cf, len(prepared.items), d)
        emb.save(d)
    log.info("cf: SASRec trained, final loss %.4f", result.metrics.get("loss", float("nan")))


# ----------------------------------------------------------------------------- stage: tokenizer (towers)

def tower_inputs(run: RunDir) -> dict[str, np.ndarray]:
    """Item and user (semantic, collaborative) inputs of the towers; user side from training history only."""
    prepared, splits = _splits(run)
    item_s = embeddings.load_npy(run.require("embeddings") / "item_text.npy", rows=len(prepared.items))
    cfe = cf.CFEmbeddings.load(run.require("cf"))
    user_s = towers.user_semantic_embeddings(item_s, [s.tolist() for s in splits.train_items])
    return {"item_s": item_s, "item_c": cfe.items, "user_s": user_s, "user_c": cfe.users}


def _tokenizer_loop(config: dict) -> None:
    """Ray Train worker: fit the item tower, then the user tower; checkpoint both and the loss history."""
    cfg = config_from_dict(config["cfg"])
    _threads(cfg)
    x = tower_inputs(RunDir(config["run_dir"]))
    files, history = {}, {}
    for name, tcfg in (("item", cfg.tokenizer.item), ("user", cfg.tokenizer.user)):
        every = max(1, cfg.tokenizer.epochs // 10)
        history[name] = {}

        def on_epoch(epoch, terms, name=name):
            for k, v in terms.items():
                history[name].setdefault(k, []).append(v)
            if epoch % every == every - 1:
                _progress(f"tokenizer/{name}", {"epoch": epoch, **terms})
                _report({"tower": name, "epoch": epoch, **terms})

        tower = towers.fit_tower(cfg.tokenizer, tcfg, x[f"{name}_s"], x[f"{name}_c"], seed=cfg.seed,
                                 on_epoch=on_epoch, device=_device(cfg))
        files[f"{name}_tower.safetensors"] = towers.tower_bytes(tower)
    files["history.json"] = json.dumps(history).encode()
    _report({"tower": "done"}, files)


def stage_tokenizer(cfg: TTDSConfig, run: RunDir) -> None:
    """Train the twin towers (Ray Train, 1 worker), export unique item IDs and user IDs + diagnostics."""
    prepared, _ = _splits(run)
    result = _trainer(_tokenizer_loop, cfg, run, "tokenizer", num_workers=1).fit()
    files = _ckpt_files(result.checkpoint)
    history = json.loads(files["history.json"])
    x = tower_inputs(run)
    with run.write_stage("tokenizer", config_hash=cfg.stage_hash("tokenizer")) as (d, numbers):
        for name, tcfg in (("item", cfg.tokenizer.item), ("user", cfg.tokenizer.user)):
            tower = towers.Tower(x[f"{name}_s"].shape[1], x[f"{name}_c"].shape[1], tcfg)
            tower.load_state_dict(_load_state(files[f"{name}_tower.safetensors"]))
            tower.eval()
            atomic_write_bytes(d / f"{name}_tower.safetensors", files[f"{name}_tower.safetensors"])
            if name == "item":
                table, stats = towers.export_item_sids(tower, x["item_s"], x["item_c"], cfg.tokenizer,
                                                       item_names=prepared.items["item_id"].tolist())
                ids = prepared.items["item_id"].tolist()
            else:
                table, stats = towers.export_user_sids(tower, x["user_s"], x["user_c"])
                ids = prepared.sequences["user_id"].tolist()
            table.save(d / f"{name}_sids.parquet", ids, prefix="i" if name == "item" else "u")
            stats["n_entities"] = len(table.codes)
            stats["sid_sha256"] = table.content_hash()
            stats.update(towers.reconstruction_errors(tower, x[f"{name}_s"], x[f"{name}_c"]))
            stats["final_terms"] = {k: v[-1] for k, v in history[name].items() if v}
            numbers[name] = stats
            plot_code_usage(table.codes, table.codebook_size, d / f"{name}_code_usage.png",
                            title=f"{name} tower: entities per code")
            plot_terms(history[name], d / f"{name}_losses.png", title=f"{name} tower loss terms")
        write_json(d / "tokenizer_stats.json", numbers)
        write_json(d / "history.json", history)
    log.info("tokenizer: %s", json.dumps({k: {m: v[m] for m in ("codes_used", "entropy") if m in v}
                                          for k, v in numbers.items()}))


def load_sid_tables(run: RunDir) -> tuple[towers.SIDTable, towers.SIDTable]:
    d = run.require("tokenizer")
    return towers.SIDTable.load(d / "item_sids.parquet"), towers.SIDTable.load(d / "user_sids.parquet")


# ----------------------------------------------------------------------------- stage: llm (LoRA)

def build_recommender_lm(cfg: TTDSConfig, run: RunDir):
    """Backbone + tokenizer with semantic-ID tokens, rows initialised from item titles, wrapped for training.

    Returns:
        ``(model, tokenizer, vocab, base_vocab_size)``.
    """
    prepared, splits = _splits(run)
    item_t, user_t = load_sid_tables(run)
    tok = llm.load_tokenizer(cfg.llm.backbone)
    base_vocab = len(tok)
    model = llm.build_backbone(cfg.llm, base_vocab, seed=cfg.seed)
    vocab = llm.add_sid_tokens(tok, item_t.n_levels, item_t.codebook_size, user_t.n_levels, user_t.codebook_size)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    llm.init_sid_rows(model, tok, vocab, item_t.codes, prepared.items["title"].tolist(), user_t.codes,
                      [s.tolist() for s in splits.train_items])
    model = llm.wrap_for_training(model, cfg.llm, vocab.new_token_ids)
    return model, tok, vocab, base_vocab


def task_context(cfg: TTDSConfig, run: RunDir, tok) -> tasks.TaskContext:
    """Everything the tuning-task builders read: training split, titles, item text (DESIGN §1.5)."""
    prepared, splits = _splits(run)
    return tasks.TaskContext(train_seqs=[s.tolist() for s in splits.train_items],
                             titles=prepared.items["title"].tolist(), item_text=prepared.items["text"].tolist(),
                             tok=tok, max_history=cfg.data.max_history, use_user_sid=cfg.tasks.use_user_sid)


def _ckpt_table(files: dict[str, bytes], name: str) -> np.ndarray | None:
    return _load_state(files[name])["codes"].numpy() if name in files else None


def _broadcast_codes(codes: np.ndarray) -> np.ndarray:
    """Rank 0's item codes on every rank (the rounds are deterministic; this guards against drift)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return codes
    t = torch.as_tensor(codes, dtype=torch.long).contiguous()
    dist.broadcast(t, src=0)
    return t.numpy()


def _llm_loop(config: dict) -> None:
    """Ray Train worker: LoRA (or full) fine-tuning on the tuning tasks of its Ray Data shard, with the
    dynamic re-indexing rounds of DESIGN §1.6 between LLM segments (none under ``static_index``).

    Checkpoints (trainable weights, item codes, item tower, step/epoch/batch, round log) are written at
    every round and epoch end; a resumed worker continues from the exact batch.
    """
    cfg = config_from_dict(config["cfg"])
    _threads(cfg)
    torch.manual_seed(cfg.seed)
    run = RunDir(config["run_dir"])
    model, tok, vocab, base_vocab = build_recommender_lm(cfg, run)
    prepared, splits = _splits(run)
    item_t, user_t = load_sid_tables(run)
    item_codes, user_tok = item_t.codes, vocab.user_tokens(user_t.codes)
    sid_ids = vocab.item_token_ids.flatten() if cfg.llm.loss_vocab == "sid" else None
    # The shard is read once through Ray Data and kept in the worker (token-id samples are small);
    # re-reading it every epoch cost a whole core on 2-core machines. Epochs shuffle locally.
    local: dict[int, list[dict]] = {}
    for r in ray.train.get_dataset_shard("train").iter_rows():
        local.setdefault(int(r["epoch"]), []).append({"ids": list(r["ids"]), "resp": list(r["resp"])})
    total, spe, bs = config["total_steps"], config["steps_per_epoch"], cfg.llm.batch_size
    opt, sched = llm.make_optimizer(model, cfg.llm, total)
    reindex_at = dynamic.reindex_steps(total, cfg.dynamic)
    tower, x, title_vecs = None, None, None
    if reindex_at:
        x = tower_inputs(run)
        tower = towers.load_tower(run.require("tokenizer") / "item_tower.safetensors", x["item_s"].shape[1],
                                  x["item_c"].shape[1], cfg.tokenizer.item)
    if cfg.llm.alpha_tok > 0:
        title_vecs = llm.title_vectors(model, tok, prepared.items["title"].tolist())
    files = _ckpt_files(ray.train.get_checkpoint())
    step, epoch0, batch0, losses, rounds = 0, 0, 0, [], []
    if files:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state = _load_state(files["trainable.safetensors"])
        assert set(state) == trainable, "checkpoint does not match the model's trainable parameters"
        model.load_state_dict(state, strict=False)
        meta = json.loads(files["state.json"])
        step, epoch0, batch0, losses, rounds = (meta["step"], meta["epoch"], meta["batch"], meta["losses"],
                                                meta["rounds"])
        item_codes = _ckpt_table(files, "item_codes.safetensors")
        if tower is not None and "item_tower.safetensors" in files:
            tower.load_state_dict(_load_state(files["item_tower.safetensors"]))
        for _ in range(step):
            sched.step()
    base = model
    model = ray.train.torch.prepare_model(llm.LMLoss(base, sid_ids))   # DDP wraps the loss (several workers)
    item_tok = vocab.item_tokens(item_codes)
    pieces = tasks.PromptPieces.build(tok)
    train_seqs = [s.tolist() for s in splits.train_items]
    item_names = prepared.items["item_id"].tolist()
    meta = {"backbone": cfg.llm.backbone, "finetune": cfg.llm.finetune, "base_vocab_size": base_vocab,
            "vocab_size": len(tok)}

    def checkpoint(epoch: int, batch: int, final: bool, metrics: dict) -> None:
        trainable = {n: p for n, p in base.named_parameters() if p.requires_grad}
        out = {"trainable.safetensors": _state_bytes(trainable),
               "item_codes.safetensors": _state_bytes({"codes": torch.as_tensor(item_codes)}),
               "state.json": json.dumps({"step": step, "epoch": epoch, "batch": batch, "losses": losses,
                                         "rounds": rounds}).encode()}
        if tower is not None:
            out["item_tower.safetensors"] = towers.tower_bytes(tower)
        if final:
            with tempfile.TemporaryDirectory() as d:
                llm.save_llm(base, tok, Path(d), meta)
                out.update({str(p.relative_to(d)): p.read_bytes() for p in Path(d).rglob("*") if p.is_file()})
        _report(metrics, out)

    def aux_loss(rng: np.random.Generator):
        if title_vecs is None:
            return None
        items = torch.as_tensor(rng.choice(len(item_codes), size=min(bs, len(item_codes)), replace=False))
        dev = llm.model_device(base)
        ids = torch.as_tensor(item_tok[items.numpy()]).to(dev)
        return lambda: cfg.llm.alpha_tok * llm.token_alignment_loss(base, ids, title_vecs[items].to(dev))

    t_start, start_step = time.time(), step
    n_epochs = max(local) + 1 if local else 0
    for epoch in range(epoch0, n_epochs):
        ep = local.get(epoch, [])
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(ep))
        rng = np.random.default_rng([cfg.seed, epoch, 1])
        ep_losses = []
        for i in range(batch0 if epoch == epoch0 else 0, min(spe, len(order) // bs)):
            if len(rounds) < len(reindex_at) and step >= reindex_at[len(rounds)]:
                r = len(rounds)
                users, hist, tgt = dynamic.guidance_prompts(train_seqs, cfg.dynamic.guide_samples,
                                                            max_history=cfg.data.max_history, seed=cfg.seed + 1000 + r)
                prompts = tasks.build_eval_prompts(hist, item_tok, user_tok[users], pieces, cfg.tasks,
                                                   max_history=cfg.data.max_history, max_length=cfg.llm.max_length)
                res = dynamic.run_round(base, tower, towers.SIDTable(item_codes, item_t.codebook_size),
                                        prompts=prompts, targets=tgt, pad_id=tok.pad_token_id,
                                        level1_token_ids=vocab.item_token_ids[0], item_s=x["item_s"],
                                        item_c=x["item_c"], tok_cfg=cfg.tokenizer, dyn_cfg=cfg.dynamic,
                                        seed=cfg.seed + r, item_names=item_names)
                tower, item_codes = res.tower, _broadcast_codes(res.table.codes)
                item_tok = vocab.item_tokens(item_codes)
                rounds.append({"round": r + 1, "step": step, **res.stats})
                _progress("llm/reindex", {"round": r + 1, "step": step, "changed": res.stats["changed"],
                                          "wall_s": res.stats["wall_s"]})
                checkpoint(epoch, i, False, {"epoch": epoch, "step": step, "round": r + 1})
            rows = [ep[j] for j in order[i * bs:(i + 1) * bs]]
            b = tasks.collate(tasks.render_batch(rows, item_tok, user_tok), tok.pad_token_id, cfg.llm.max_length)
            ep_losses.append(llm.train_step(model, opt, sched, b, aux_loss=aux_loss(rng)))
            losses.append(ep_losses[-1])
            step += 1
            if step % 50 == 0:
                _progress("llm", {"epoch": epoch, "step": f"{step}/{total}", "loss": float(np.mean(losses[-50:])),
                                  "sec_per_step": round((time.time() - t_start) / (step - start_step), 3)})
            if step >= total:
                break
        done = step >= total or epoch == n_epochs - 1
        checkpoint(epoch + 1, 0, done, {"epoch": epoch, "step": step,
                                        "loss": float(np.mean(ep_losses)) if ep_losses else None})
        if done:
            break


def llm_budget(n_samples: int, cfg: TTDSConfig) -> tuple[int, int, int]:
    """``(steps_per_epoch, total_steps, n_epochs)`` per worker: ``llm.epochs`` passes over the samples,
    capped by ``llm.max_steps``; static and dynamic runs of a config get the same budget."""
    spe = max(1, n_samples // (cfg.llm.batch_size * cfg.ray.num_workers))
    total = min(cfg.llm.max_steps or 10 ** 12, spe * cfg.llm.epochs)
    return spe, total, -(-total // spe)


def stage_llm(cfg: TTDSConfig, run: RunDir) -> None:
    """Fine-tune the recommender LM as a Ray Train job fed by a Ray Dataset of tuning-task samples
    (templates re-sampled per epoch), with dynamic re-indexing rounds unless ``dynamic.static_index``."""
    tok = llm.load_tokenizer(cfg.llm.backbone)
    item_t, user_t = load_sid_tables(run)
    vocab = llm.add_sid_tokens(tok, item_t.n_levels, item_t.codebook_size, user_t.n_levels, user_t.codebook_size)
    ctx = task_context(cfg, run, tok)
    first = tasks.build_task_samples(ctx, cfg.tasks, seed=cfg.seed, epoch=0)
    if not first:
        raise ConfigError("no training samples: every tasks.weights entry is 0 or the training split is empty")
    spe, total, n_epochs = llm_budget(len(first), cfg)
    stats = tasks.task_stats(first, item_t.n_levels, user_t.n_levels)
    for name in cfg.tasks.weights.active():
        if name not in stats:
            log.warning("llm: task %s is on (weight %g) but built no samples on this data (e.g. no user has a "
                        "neighbour, no item has brand/category text, or tasks.use_user_sid=false)", name,
                        cfg.tasks.weights.active()[name])
    item_tok, user_tok = vocab.item_tokens(item_t.codes), vocab.user_tokens(user_t.codes)
    for name, st in stats.items():
        ex = next(s for s in first if s["task"] == name)
        log.info("llm: task %-15s %6d samples/epoch, mean %.1f tokens; e.g. %s", name, st["n"], st["mean_tokens"],
                 tasks.example_text(ex, tok, item_tok, user_tok))
    rows = []
    for epoch in range(n_epochs):
        samples = first if epoch == 0 else tasks.build_task_samples(ctx, cfg.tasks, seed=cfg.seed, epoch=epoch)
        rows += [{"epoch": epoch, "ids": s["ids"], "resp": s["resp"]} for s in samples]
    log.info("llm: %d steps (%d per epoch, %d epoch(s)); re-index after steps %s", total, spe, n_epochs,
             dynamic.reindex_steps(total, cfg.dynamic))
    ds = ray.data.from_items(rows)
    result = _trainer(_llm_loop, cfg, run, "llm", datasets={"train": ds},
                      extra={"total_steps": total, "steps_per_epoch": spe}).fit()
    files = _ckpt_files(result.checkpoint)
    state = json.loads(files["state.json"])
    losses, rounds = state["losses"], state["rounds"]
    codes = _ckpt_table(files, "item_codes.safetensors")
    with run.write_stage("llm", config_hash=cfg.stage_hash("llm"), numbers={
            "n_samples_per_epoch": len(first), "tasks": stats, "steps": len(losses), "static_index":
            cfg.dynamic.is_static, "changed_per_round": [r["changed"] for r in rounds],
            "final_loss": float(np.mean(losses[-20:])) if losses else None}) as (d, _):
        for name, blob in files.items():
            if name.split("/")[0] in ("tokenizer", "adapter", "model", "llm_meta.json", "item_tower.safetensors"):
                atomic_write_bytes(d / name, blob)
        prepared = data.Prepared.load(run.require("data"))
        towers.SIDTable(codes, item_t.codebook_size).save(d / "item_sids.parquet", prepared.items["item_id"].tolist(),
                                                          prefix="i")
        write_json(d / "losses.json", losses)
        write_json(d / "rounds.json", rounds)
        write_json(d / "task_stats.json", stats)
        plot_curve(losses, d / "loss.png", title=f"LLM training loss ({cfg.llm.backbone})", ylabel="NLL (nats/token)",
                   marks=[r["step"] for r in rounds])
    log.info("llm: %d steps, final loss %.4f, items re-indexed per round %s", len(losses),
             np.mean(losses[-20:]) if losses else float("nan"), [r["changed"] for r in rounds])


# ----------------------------------------------------------------------------- stage: eval

def stage_eval(cfg: TTDSConfig, run: RunDir, *, progress: bool = True) -> dict:
    """Test-split evaluation of TTDS, SASRec and popularity; writes eval/metrics.json + rankings."""
    _, splits = _splits(run)
    metrics, rows, ranked = evaluate.evaluate_split(cfg, run, "test", progress=progress)
    with run.write_stage("eval", config_hash=cfg.stage_hash("eval"),
                         numbers={"HR@10": metrics["models"]["TTDS"].get("HR@10")}) as (d, _):
        write_json(d / "metrics.json", metrics)
        pd.DataFrame({"user_idx": splits.user_idx[rows], "target": splits.test_target[rows],
                      "ranked": list(ranked)}).to_parquet(d / "rankings.parquet")
    return metrics


# ----------------------------------------------------------------------------- the job

STAGE_FUNCS = {"data": stage_data, "embeddings": stage_embeddings, "cf": stage_cf, "tokenizer": stage_tokenizer,
               "llm": stage_llm, "eval": stage_eval}


def _save_config(cfg: TTDSConfig, run: RunDir) -> None:
    """Write the resolved config; stages built from other settings are rebuilt (see stage_hash)."""
    atomic_write_bytes(run.root / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())


def _validate_inputs(cfg: TTDSConfig) -> None:
    """Fail before any training (and before the run directory is touched) on bad input.

    Reads and prepares the dataset (seconds), checks that the item ID space can hold the catalogue,
    and that the text encoder and the backbone can be found offline.

    Raises:
        data.DataError, CollisionError, EncoderUnavailable, llm.BackboneUnavailable.
    """
    from .quantizer import CollisionError

    prepared = data.prepare(data.read_raw(cfg.data), kcore=cfg.data.kcore, seed=cfg.seed)
    t = cfg.tokenizer.item
    n_items = len(prepared.items)
    if n_items > t.codebook_size ** t.n_levels:
        raise CollisionError(f"{n_items} items cannot get unique semantic IDs from {t.n_levels} levels x "
                             f"{t.codebook_size} codes ({t.codebook_size ** t.n_levels} IDs); raise "
                             "tokenizer.item.codebook_size or tokenizer.item.n_levels")
    if cfg.embeddings.text_encoder == "llm":
        llm.check_backbone(cfg.embeddings.llm_backbone, "embeddings.llm_backbone")
    else:
        embeddings.minilm_path()
    llm.check_backbone(cfg.llm.backbone)


def reuse_stages(cfg: TTDSConfig, src: Path, run: RunDir) -> list[str]:
    """Hard-link (or copy) the finished stages of run directory ``src`` that were built from the same
    settings as ``cfg`` into ``run``, in stage order, stopping at the first that differs.

    Returns:
        The stages taken over. Each is linked into a temp sibling and renamed in (atomic).

    Raises:
        ConfigError: ``src`` is not a run directory.
    """
    src_run = RunDir(src)
    if not (Path(src) / "data" / "MANIFEST.json").is_file():
        raise ConfigError(f"--reuse-from {src}: not a run directory with a finished data stage")
    taken = []
    for stage in STAGE_FUNCS:
        h = cfg.stage_hash(stage)
        if not src_run.is_complete(stage, h):
            changed = src_run.changed_inputs(stage)
            if src_run.is_complete(stage) and changed and src_run.manifest(stage).get("config_hash") == h:
                log.warning("--reuse-from %s: stage %s has the same settings but was built from other inputs "
                            "(%s changed since); it is rebuilt here", src, stage, ", ".join(changed))
            break
        if not run.is_complete(stage, h):
            dst = run.stage_dir(stage)
            tmp = dst.with_name(f".{stage}.reuse-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)

            def link(a, b):
                try:
                    os.link(a, b)
                except OSError:
                    shutil.copy2(a, b)
            shutil.copytree(src_run.stage_dir(stage), tmp, copy_function=link)
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(tmp, dst)
        taken.append(stage)
    if not taken:
        raise ConfigError(f"--reuse-from {src}: its data stage was built from other settings (data path, "
                          "k-core or seed differ), so nothing can be shared; drop --reuse-from")
    return taken


def run_training(cfg: TTDSConfig, *, overwrite: bool = False, stop_after: str | None = None,
                 reuse_from: str | Path | None = None) -> dict:
    """Run every stage not already finished with the same settings, in order.

    A stage is reused when its manifest's ``config_hash`` equals ``cfg.stage_hash(stage)``;
    otherwise it is rebuilt and swapped in atomically when done (the old version stays until then).
    ``overwrite`` rebuilds every stage. Returns eval/metrics.json (or {} if stopped earlier).

    Raises:
        ConfigError / data.DataError / llm.BackboneUnavailable: before anything is trained.
    """
    t0 = time.time()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")       # validation must not wait on hub retries
    if stop_after is not None and stop_after not in STAGE_FUNCS:
        raise ConfigError(f"--stop-after {stop_after!r}: not a stage; stages are {', '.join(STAGE_FUNCS)}")
    if reuse_from is not None and not (Path(reuse_from) / "data" / "MANIFEST.json").is_file():
        raise ConfigError(f"--reuse-from {reuse_from}: not a run directory with a finished data stage")
    if not RunDir(cfg.run_dir).is_complete("data", cfg.stage_hash("data")):
        _validate_inputs(cfg)
    run = RunDir(cfg.run_dir)
    try:
        run.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run directory {run.root}: {e}; set output_dir to a writable "
                          "directory") from None
    _save_config(cfg, run)
    if reuse_from is not None:
        if overwrite:
            log.warning("--overwrite rebuilds every stage: --reuse-from %s is ignored", reuse_from)
        else:
            log.info("reused from %s: %s", reuse_from, reuse_stages(cfg, Path(reuse_from), run))
    handler = logging.FileHandler(run.root / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger("ttds_ray").addHandler(handler)
    logging.getLogger("ttds_ray").setLevel(logging.INFO)
    try:
        init_ray(cfg)
        walls = {}
        rebuild = overwrite                     # once a stage is rebuilt, everything downstream is too
        for stage, fn in STAGE_FUNCS.items():
            if run.is_complete(stage, cfg.stage_hash(stage)) and not rebuild:
                log.info("%s: already complete, skipped", stage)
            else:
                if rebuild:                     # no resuming from an older run's Ray Train checkpoints
                    shutil.rmtree(run.root / "ray_results" / f"{stage}-{cfg.stage_hash(stage)}", ignore_errors=True)
                rebuild = True
                ts = run.stage_started[stage] = time.time()
                log.info("%s: starting", stage)
                fn(cfg, run)
                # the stage's artifacts are in place: its Ray Train checkpoints (kept for resuming an
                # interrupted stage) are not needed any more
                shutil.rmtree(run.root / "ray_results" / f"{stage}-{cfg.stage_hash(stage)}", ignore_errors=True)
                walls[stage] = round(time.time() - ts, 1)
                log.info("%s: done in %.1f s", stage, walls[stage])
            if stage == stop_after:
                return {}
        metrics = read_json(run.require("eval") / "metrics.json")
        metrics["stage_wall_s"] = walls
        metrics["job_wall_s"] = round(time.time() - t0, 1)
        write_json(run.root / "metrics.json", metrics)
        return metrics
    finally:
        logging.getLogger("ttds_ray").removeHandler(handler)
        handler.close()
