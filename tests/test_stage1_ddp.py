"""DDP equivalence: 2 gloo CPU processes give the same loss and gradients as 1 process on the joined batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from stage1_fixtures import write_tiny_setup

from training.config import Stage1Config, load_config
from training.data.features import cancer_type_batches, collate
from training.losses import LossWeights
from training.stage1 import build_model, prepare_data, seed_everything, step_loss


def _loss_and_grads(cfg: Stage1Config, rank: int, world: int) -> tuple[float, dict[str, torch.Tensor]]:
    seed_everything(cfg.seed)
    train_ds, _, _, genes, _ = prepare_data(cfg)
    model = build_model(cfg, train_ds.n_features, genes)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    # eval(): dropout draws differ per process by construction; the loss/gradient algebra is what is tested
    net.eval()
    batch_ids = cancer_type_batches(train_ds.labels, cfg.optim.batch_size, cfg.optim.per_class, cfg.seed, 0)[0]
    local = cfg.optim.batch_size // world
    batch = collate([train_ds[i] for i in batch_ids[rank * local : (rank + 1) * local]])
    loss, _ = step_loss(net, batch, LossWeights(**cfg.loss.model_dump()), torch.device("cpu"))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _worker(rank: int, world: int, port: int, config: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loss, grads = _loss_and_grads(load_config(config), rank, world)
        torch.save({"loss": loss, "grads": grads}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process(tmp_path):
    config = write_tiny_setup(tmp_path)
    mp.spawn(_worker, args=(2, _free_port(), str(config), str(tmp_path)), nprocs=2, join=True)
    ref_loss, ref_grads = _loss_and_grads(load_config(config), 0, 1)
    assert len(ref_grads) > 20
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert abs(got["loss"] - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
        assert set(got["grads"]) == set(ref_grads)
        for name, g in ref_grads.items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    # the text, gene and aggregator parts all received gradient
    for prefix in ("vision_encoder.", "text_encoder.", "gene_encoder.", "proj_text.", "proj_gene.", "logit_scale"):
        assert any(n.startswith(prefix) and ref_grads[n].abs().sum() > 0 for n in ref_grads), prefix
