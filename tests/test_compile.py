"""``model.compile``: the training loss compiles as one graph (``fullgraph=True``: no break, nothing the compiler
cannot guard on) and gives eager's losses. Compiled with inductor on the CPU (needs a C++ compiler); the GPU run
uses the same graph."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.test_host_sync import batch, build

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="torch.compile on CPU needs a C++ compiler")


@pytest.mark.parametrize("model", ["yolo", pytest.param("faster_rcnn", marks=pytest.mark.slow)])
def test_the_compiled_loss_is_one_graph_and_equals_eager(model):
    import torch._dynamo
    import torch._inductor.config as inductor_config

    detector = build(model).detector
    images, targets = batch()
    torch.manual_seed(1)
    eager = detector.loss(images, targets)
    torch._dynamo.reset()
    compiled = torch.compile(detector.loss, fullgraph=True)
    torch.manual_seed(1)
    with inductor_config.patch(fallback_random=True):  # the samplers' draws as in eager
        losses = compiled(images, targets)
    sum(losses.values()).backward()
    assert set(losses) == set(eager)
    for name in eager:
        torch.testing.assert_close(losses[name], eager[name], rtol=1e-3, atol=1e-4, msg=name)
    trainable = [n for n, p in detector.named_parameters() if p.requires_grad]
    assert [n for n in trainable if detector.get_parameter(n).grad is None] == []
