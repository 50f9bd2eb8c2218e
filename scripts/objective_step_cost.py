"""Step cost of every objective relative to flow matching on the digits default (docs/objectives.md).

    python scripts/objective_step_cost.py FLOW_MATCHING_RUN_DIR [ROUNDS]

Steps of all objectives are interleaved after a warm-up, so machine noise hits them alike; median ms per step
(DMD2: mean over whole critic + generator cycles). DMD2 starts from the given finished run (trainer.init_from).
One thread, as the sweep in docs/objectives.md was run.
"""

import statistics
import sys
import time

import torch

from fewstep.config.schema import compose_config as compose
from fewstep.training import checkpoint as ck
from fewstep.training.trainables import build_components, make_optimizer

torch.set_num_threads(1)
init = sys.argv[1] if len(sys.argv) > 1 else None
names = ["flow_matching", "rcgm", "twinflow", "meanflow", "scm", "dmd2"]
runners = {}
for name in names:
    extra = [f"trainer.init_from={init}"] if name == "dmd2" else []
    cfg = compose([f"objective={name}", *extra])
    torch.manual_seed(0)
    data, obj, model, teacher, _ = build_components(cfg)
    if name == "dmd2":
        ck.load_initial_weights(init, model)
    obj.setup(model, data)
    nets = {"student": model, **{n: net.module for n, net in obj.networks.items()}}
    opts = {n: make_optimizer([p for p in m.parameters() if p.requires_grad], lr=1e-4) for n, m in nets.items()}
    obj.bind({n: m for n, m in nets.items() if n != "student"})
    teacher.bind(model)
    runners[name] = dict(obj=obj, model=model, teacher=teacher, opts=opts, it=data.batches(0), step=0, times=[], nfe=[])


def step(r):
    batch = next(r["it"])
    s = r["step"]
    t0 = time.perf_counter()
    stepping = r["obj"].stepping(s)
    if "student" in stepping:
        r["teacher"].update(r["model"], s)
    loss, logs = r["obj"].loss(r["model"], r["teacher"], batch, s)
    loss.backward()
    for n in stepping:
        r["opts"][n].step()
    for o in r["opts"].values():
        o.zero_grad(set_to_none=True)
    r["step"] += 1
    r["nfe"].append(float(logs["nfe/per_step"]))
    return time.perf_counter() - t0


for r in runners.values():
    for _ in range(3):
        step(r)
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 12):
    for r in runners.values():
        for _ in range(6 if r is runners["dmd2"] else 1):  # dmd2: one full cycle (5 critic + 1 generator)
            r["times"].append(step(r))
fm = statistics.median(runners["flow_matching"]["times"])
print("| objective | ms / step (median) | x flow matching | network evals / step |")
print("|---|---|---|---|")
for n, r in runners.items():
    med = statistics.median(r["times"]) if n != "dmd2" else statistics.mean(r["times"])
    print(f"| {n} | {med * 1000:.1f} | {med / fm:.2f} | {statistics.mean(r['nfe'][3:]):.2f} |")
