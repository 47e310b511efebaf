"""How many groups the batched AutoAugment runs per batch, against one group per (sub-policy, sign).

Usage: python bench/aa_groups.py [POLICY] [BATCH] [BATCHES]. Counted from the draws alone (the
same draws the device path makes), as the mean over BATCHES batches; prints both counts.
"""

from __future__ import annotations

import sys

import torch

from cifar100.data.batched import _GEOMETRIC, BatchAutoAugment


def groups(aa: BatchAutoAugment, batch: int, seed: int) -> tuple[int, int]:
    """(groups by sub-policy and sign, groups by op type) over both slots of one batch."""
    draws = aa.draw(batch, torch.Generator().manual_seed(seed))
    by_policy = by_type = 0
    for slot in (0, 1):
        op = aa.op_ids[draws.policy, slot]
        applies = draws.applies[:, slot] <= aa.probability[draws.policy, slot]
        sign = torch.where(aa.signed[op], draws.negative[:, slot].long(), -1)
        by_policy += len({(int(p), int(s)) for p, s in zip(draws.policy[applies], sign[applies])})
        by_type += len({"geometric" if aa.ops[int(o)] in _GEOMETRIC else aa.ops[int(o)] for o in op[applies]})
    return by_policy, by_type


if __name__ == "__main__":
    policy, batch, batches = (sys.argv[1:] + ["cifar10", "512", "20"][len(sys.argv) - 1 :])[:3]
    counts = [groups(BatchAutoAugment(policy), int(batch), seed) for seed in range(int(batches))]
    old, new = (sum(c[i] for c in counts) / len(counts) for i in (0, 1))
    print(f"{policy}, {batch} images: {old:.1f} groups by (sub-policy, sign), {new:.1f} by op type")
