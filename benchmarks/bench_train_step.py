"""Benchmark 3: training-step cost on CPU, CF-DeiT-S (with and without selection) against DeiT-S.

One step = forward, the CF-ViT loss (cross-entropy on the fine output + KL(coarse || fine)), or
plain cross-entropy for DeiT-S, backward and an AdamW step, batch 32. Interleaved repetitions,
medians; compared with the ratio of forward GFLOPs.

    python benchmarks/bench_train_step.py [--reps 5] [--batch 32]
"""
from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F

from common import interleaved, machine, median, save
import models  # noqa: E402,F401
from utils.inference.flops import count_gflops, stage_gflops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--batch', type=int, default=32)
    args = p.parse_args()
    torch.manual_seed(0)
    deit = timm.create_model('deit_small_patch16_224', drop_path_rate=0.1).train()
    cf_sel = timm.create_model('cf_deit_small', coarse_stage_size=7, drop_path_rate=0.1).train()
    cf_nosel = timm.create_model('cf_deit_small', coarse_stage_size=7, drop_path_rate=0.1).train()
    cf_sel.set_informative_selection(True)
    cf_nosel.set_informative_selection(False)
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.randint(0, 1000, (args.batch,))
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (deit, cf_sel, cf_nosel)}

    def step_deit() -> None:
        loss = F.cross_entropy(deit(x), y)
        opts[deit].zero_grad(set_to_none=True)
        loss.backward()
        opts[deit].step()

    def step_cf(model) -> None:
        coarse, fine = model(x)
        loss = F.cross_entropy(fine, y) + F.kl_div(
            coarse.log_softmax(-1), fine.detach().softmax(-1), reduction='batchmean')
        opts[model].zero_grad(set_to_none=True)
        loss.backward()
        opts[model].step()

    programs = {'deit_small_patch16_224': step_deit,
                'cf_deit_small, selection on': lambda: step_cf(cf_sel),
                'cf_deit_small, selection off': lambda: step_cf(cf_nosel)}
    times = interleaved(programs, args.reps)
    with torch.no_grad():
        gflops = {'deit_small_patch16_224': count_gflops(deit.eval(), torch.zeros(1, 3, 224, 224)),
                  'cf_deit_small, selection on': stage_gflops(cf_sel)[1],
                  'cf_deit_small, selection off': stage_gflops(cf_nosel, selection=False)[1]}
    base_t, base_f = median(times['deit_small_patch16_224']), gflops['deit_small_patch16_224']
    rows = []
    for name, ts in times.items():
        rows.append({'program': name, 'median_seconds': median(ts), 'all_seconds': ts,
                     'forward_gflops_per_image': gflops[name], 'time_ratio_vs_deit': median(ts) / base_t,
                     'gflops_ratio_vs_deit': gflops[name] / base_f,
                     'time_ratio_over_gflops_ratio': (median(ts) / base_t) / (gflops[name] / base_f)})
        print(f'{name:30s} {median(ts):7.3f} s/step  time x{median(ts) / base_t:4.2f}  GFLOPs x{gflops[name] / base_f:4.2f}')
    save('train_step', {'benchmark': 'training step, CPU, float32', 'machine': machine(), 'batch': args.batch,
                        'reps': args.reps, 'rows': rows})


if __name__ == '__main__':
    main()
