"""How much of what the network removes is its free residual rather than its mix of blurs (study only).

For the shipped and the two fold-fine-tuned weights, at k = 2 (first two pairs) on each real long scan:
the residual channel's energy over the energy of (mean - mix of blurs), and the energy of what the whole
proposal removes over that, both inside the head. Prints one line per weights file.

    python studies/real_n2n/residual_share.py
"""

from __future__ import annotations

import torch
from asl_enhance.transforms import NormalizeASLd

from asl_bench import core
from asl_bench import fidelity as fd

WEIGHTS = ["asl_bundle/models/model.pt", "runs/real_n2n/prisma/model.pt", "runs/real_n2n/other/model.pt"]


def energy(a: torch.Tensor, head: torch.Tensor) -> float:
    return float((a[head] ** 2).mean())


def main() -> None:
    series = fd.study_series()
    for path in WEIGHTS:
        net = core.build_model(f"x={path}", core.INFERENCE_CONFIG)
        cells = []
        for s in series:
            d = NormalizeASLd(keys=("input_mean",), layout=net.layout)(core.prepare(s, [0, 1]))
            x = torch.as_tensor(d["image"][None])
            with torch.no_grad():
                mean, stack = x[:, :1], net.net.blur_stack(x[:, :1])
                out = net.net.backbone(torch.cat([x, stack], 1))
                blurs = (torch.softmax(out[:, : net.net.num_scales], 1) * stack).sum(1, keepdim=True)
                residual = out[:, net.net.num_scales : net.net.num_scales + 1]
            head = torch.as_tensor(s.brain[None, None])
            removed = energy(mean - blurs, head)
            cells.append(
                f"{s.name.split('/')[1]} {energy(residual, head) / removed:.2f}/"
                f"{energy(mean - blurs - residual, head) / removed:.2f}"
            )
        print(path, " ".join(cells))


if __name__ == "__main__":
    main()
