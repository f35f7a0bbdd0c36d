"""The fused AdamW step after a universal load, on the GPU: DeepSpeed's universal load leaves the
converter's CPU `step` tensor in the state of CUDA partitions, and torch's fused kernel reads
`state_steps` by raw pointer on the device (FusedAdamWKernel.cu). UniversalLoadRepair moves it.

    python -m pytest tests/gpu/test_universal_repair_gpu.py -m gpu
"""

from __future__ import annotations

import pytest
import torch

from core.checkpoints import UNIVERSAL_LATEST
from train.reshard import UniversalLoadRepair

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available: the fused kernel needs a GPU"),
]


def test_fused_adamw_steps_on_after_the_repair_as_if_never_interrupted(tmp_path):
    torch.manual_seed(0)
    grads = [torch.randn(4096, device="cuda") for _ in range(3)]
    straight = torch.zeros(4096, device="cuda", requires_grad=True)
    adam = torch.optim.AdamW([straight], lr=1e-2, fused=True)
    for grad in grads[:2]:
        straight.grad = grad.clone()
        adam.step()
    # What DeepSpeed's universal load builds: the same weights and moments, the saved CPU step.
    resumed = straight.detach().clone().requires_grad_(True)
    reloaded = torch.optim.AdamW([resumed], lr=1e-2, fused=True)
    saved = adam.state[straight]
    reloaded.state[resumed] = {"step": torch.tensor(2.0), "exp_avg": saved["exp_avg"].clone(),
                               "exp_avg_sq": saved["exp_avg_sq"].clone()}
    ckpt = tmp_path / "checkpoint-2"
    (ckpt / "global_step2_universal" / "zero").mkdir(parents=True)
    (ckpt / UNIVERSAL_LATEST).write_text("global_step2_universal")
    torch.save({"param_groups": [dict(g, params=[0]) for g in adam.param_groups]},
               ckpt / "global_step2_universal" / "zero" / "optimizer_state.pt")

    UniversalLoadRepair(str(ckpt)).on_train_begin(None, None, None, optimizer=reloaded)
    assert reloaded.state[resumed]["step"].device == resumed.device
    for opt, param in ((adam, straight), (reloaded, resumed)):
        param.grad = grads[2].clone()
        opt.step()
    torch.cuda.synchronize()
    assert reloaded.state[resumed]["step"].item() == 3.0
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)
