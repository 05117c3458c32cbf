"""The flow-proof benchmark's per-colour score: renders of known colours score 1 for their own colour and 0 when the
prompts name another."""

from __future__ import annotations

import torch

from benchmarks.flow_proof import colour_accuracy
from lightning_ft.embedded import shapes
from lightning_ft.embedded.feature_net import default_feature_net


def test_colour_accuracy_is_per_prompted_colour():
    specs = [shapes.spec_for_index(5, i) for i in range(24)]
    images = torch.stack([torch.from_numpy(shapes.render(s, 32)).permute(2, 0, 1).float() / 255 for s in specs])
    net = default_feature_net()
    right = colour_accuracy(images, [s.caption for s in specs], net)
    assert right and all(v == 1.0 for v in right.values())
    names = net.label_names["color"]
    wrong_prompts = []
    for s in specs:
        other = names[(names.index(s.color) + 1) % len(names)]
        wrong_prompts.append(f"a {other} {s.shape} on a {s.background} background")
    wrong = colour_accuracy(images, wrong_prompts, net)
    assert all(v == 0.0 for v in wrong.values())
