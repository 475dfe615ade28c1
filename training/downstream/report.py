"""The report task: a report generator over patch features (`report.arch`: HistGen by default, or the resampler),
scored against a retrieval baseline (the report of the nearest training case by slide embedding)."""

from __future__ import annotations

import copy
import logging
import math

import torch

from service.errors import InvalidParameterError
from training.cohort import Case, FeatureStore, by_split, load_cohort, load_reports, require_splits
from training.downstream.common import finish_run, sample_bag, slide_embeddings, stage1_vision
from training.downstream.config import DownstreamConfig
from training.metrics import caption_metrics
from training.models.report_arch import build_report_model, report_kwargs
from training.models.report_decoder import Vocabulary, normalize

log = logging.getLogger(__name__)


def _pad_batch(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(f.shape[0] for f in feats)
    x = torch.zeros(len(feats), n, feats[0].shape[1])
    mask = torch.ones(len(feats), n, dtype=torch.bool)
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = False
    return x, mask


def train_report(cfg: DownstreamConfig) -> dict:
    rc = cfg.report
    store = FeatureStore(cfg.features_dir)
    reports = load_reports(cfg.reports)
    if not reports:
        raise InvalidParameterError("the report task needs `reports` (a JSON-lines file of {case_id, report})")
    cases = [c for c in load_cohort(cfg.cohort) if reports.get(c.case_id)]
    splits = by_split(cases)
    require_splits(splits)
    vocab = Vocabulary.build((reports[c.case_id] for c in splits["train"]), rc.min_freq)
    n_features = store.dim(splits["train"][0])
    model = build_report_model(report_kwargs(rc.arch, rc.model_dump(), n_features=n_features, vocab_size=len(vocab)))
    opt = torch.optim.Adam(model.parameters(), lr=rc.lr, weight_decay=5e-5, amsgrad=True)
    if rc.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    else:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=rc.gamma)
    gen = torch.Generator().manual_seed(cfg.seed)
    train = splits["train"]
    targets = {c.case_id: torch.tensor(vocab.encode(reports[c.case_id], rc.max_len)) for c in train}

    def generate(cs: list[Case], beam: int) -> list[str]:
        model.eval()
        if beam <= 1:  # batched greedy: one decoder call per position for the whole split
            outs = []
            for i in range(0, len(cs), 32):
                x, mask = _pad_batch([store.case(c) for c in cs[i : i + 32]])
                outs += [vocab.decode(ids) for ids in model.greedy_batch(x, mask)]
            return outs
        return [vocab.decode(model.beam_search(store.case(c), beam=beam)) for c in cs]

    def refs(cs: list[Case]) -> list[str]:
        return [normalize(reports[c.case_id]) for c in cs]

    best, best_state, best_epoch, history = -math.inf, None, -1, []
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen).tolist()
        total, steps = 0.0, 0
        for b in range(0, len(order), rc.batch_size):
            batch = [train[i] for i in order[b : b + rc.batch_size]]
            x, mask = _pad_batch([sample_bag(store.case(c), cfg.max_patches, gen) for c in batch])
            toks = torch.nn.utils.rnn.pad_sequence(
                [targets[c.case_id] for c in batch], batch_first=True, padding_value=Vocabulary.PAD
            )
            logits = model(x, toks[:, :-1], mask)
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1), ignore_index=Vocabulary.PAD
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        sched.step()
        lr_now = opt.param_groups[0]["lr"]
        if (epoch + 1) % rc.val_every and epoch != cfg.epochs - 1:
            history.append({"epoch": epoch, "train_loss": total / max(steps, 1), "lr": lr_now})
            continue
        val_scores = caption_metrics(refs(splits["val"]), generate(splits["val"], rc.val_beam), meteor=False)
        score = val_scores["BLEU_4"]
        history.append({"epoch": epoch, "train_loss": total / max(steps, 1), "val_score": score, "lr": lr_now})
        log.info("epoch %d loss %.4f val BLEU-4 %.4f", epoch, total / max(steps, 1), score)
        if score > best or best_state is None:
            best, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), epoch
    model.load_state_dict(best_state)

    # retrieval baseline: the report of the nearest training case by slide embedding
    encoder = stage1_vision(cfg)
    train_emb = slide_embeddings(store, train, encoder)
    result, preds = {}, {}
    for split in ("val", "test"):
        cs = splits[split]
        hyp = generate(cs, rc.beam)
        nn_idx = (slide_embeddings(store, cs, encoder) @ train_emb.T).argmax(1)
        base = [normalize(reports[train[j].case_id]) for j in nn_idx]
        ref = refs(cs)
        result[split] = {
            "generated": caption_metrics(ref, hyp, meteor=rc.meteor and split == "test"),
            "retrieval_baseline": caption_metrics(ref, base, meteor=rc.meteor and split == "test"),
        }
        preds[split] = {
            "case_ids": [c.case_id for c in cs],
            "reference": ref,
            "generated": hyp,
            "retrieval_baseline": base,
        }
    meta = {
        "vocabulary": vocab.to_dict(),
        "n_features": n_features,
        "decoder": {**rc.model_dump(), "vocab_size": len(vocab), "n_features": n_features},
        "baseline_embedding": "stage1" if encoder is not None else "mean_patch_features",
    }
    return finish_run(cfg, model, meta, result, preds, history, best_epoch)
