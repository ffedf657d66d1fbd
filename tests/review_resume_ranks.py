"""torchrun helper of test_resume_ranks_and_errors: a 2-rank gradual run stopped at an epoch boundary
and resumed from rank 0's manager state (what a checkpoint holds), per-rank seeds as
timm's random_seed(seed, rank) sets them; the replicas are kept identical by DDP, as in training. Prints one line per rank with the differing tensors."""

import copy
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import test_exact_resume as E

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, name = dist.get_rank(), sys.argv[1]


def seed_all() -> None:
    torch.manual_seed(5 + rank)
    random.seed(5 + rank)
    np.random.seed(5 + rank)


train_loader = DataLoader(E.Noisy(32, 0), batch_size=8, shuffle=True)
model, opt, manager, sampler = E.setup(name)  # toy.mlp() reseeds with 0: seed per rank after
seed_all()
wrapped = manager.modify(model, opt, steps_per_epoch=4, grad_sampler=sampler)
E.train(DDP(model), wrapped, train_loader, range(E.EPOCHS))
full = copy.deepcopy(model.state_dict())

model, opt, manager, sampler = E.setup(name)
seed_all()
wrapped = manager.modify(model, opt, steps_per_epoch=4, grad_sampler=sampler)
E.train(DDP(model), wrapped, train_loader, range(E.STOP))
saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
shared = [manager.state_dict()]
dist.broadcast_object_list(shared, src=0)  # the checkpoint is written by rank 0
rng = E.rng_state()  # per-rank RNG states are saved per rank by the script
mine = copy.deepcopy(manager.rank_state_dict())  # so is the per-rank manager state

model, opt, manager, sampler = E.setup(name)
seed_all()  # the resumed process seeds itself as the script does
model.load_state_dict(saved["model"])
opt.load_state_dict(saved["opt"])
manager.load_state_dict(shared[0])
wrapped = manager.modify(model, opt, steps_per_epoch=4, epoch=E.STOP, grad_sampler=sampler)
manager.load_rank_state_dict(mine)
model.load_state_dict(saved["model"])
E.set_rng(rng)
E.train(DDP(model), wrapped, train_loader, range(E.STOP, E.EPOCHS))
diff = [k for k, v in full.items() if not torch.equal(model.state_dict()[k], v)]
print(f"RESULT rank {rank} differing={diff}", flush=True)
