"""Checks that need a CUDA device: run with `pytest -m gpu` on a GPU machine."""

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from medaug.metrics import FeatureExtractor, predict_proba, train_classifier
from medaug.model import EMA, network_from_spec
from medaug.sampling import inference_scheduler, sample_images
from medaug.training import DiffusionStep, TrainSettings, fit, prepare_for_speed

from .test_model import SPEC

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_bf16_compiled_training_learns_and_keeps_schedule_fp32():
    torch.manual_seed(0)
    net = network_from_spec({**SPEC, "use_flash_attention": True}).cuda()
    ema = EMA(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    model = prepare_for_speed(net, channels_last=True, compile_mode="default")
    sch = DDPMScheduler(num_train_timesteps=100)
    x = (torch.rand(16, 1, 16, 16, device="cuda") * 2 - 1).contiguous(memory_format=torch.channels_last)
    y = torch.arange(16, device="cuda") % 3
    step = DiffusionStep(model, sch, x, y, null_class=3, amp_dtype=torch.bfloat16, channels_last=True)
    result = fit(model, ema, opt, step, TrainSettings(max_steps=60, batch_size=16, log_every=20, ckpt_every=0))
    assert result.losses[-1][1] < result.losses[0][1]
    assert sch.alphas_cumprod.dtype == torch.float32


@needs_cuda
def test_cuda_sampling_is_seeded():
    torch.manual_seed(0)
    net = network_from_spec({**SPEC, "use_flash_attention": True}).cuda().eval()
    labels = torch.tensor([0, 1, 2, 0])
    kw = dict(guidance_scale=2.0, null_class=3, batch_size=4, progress=False, amp_dtype=torch.bfloat16)
    spec = {"num_train_timesteps": 100}  # a fresh scheduler per call, as sample does
    a = sample_images(net, inference_scheduler(spec, "dpmpp_2m_sde", 10), labels, [16, 16], seed=3, **kw)
    b = sample_images(net, inference_scheduler(spec, "dpmpp_2m_sde", 10), labels, [16, 16], seed=3, **kw)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert a.device.type == "cpu" and a.shape == (4, 1, 16, 16)


@needs_cuda
def test_evaluation_classifier_trains_on_the_gpu_and_answers_on_the_cpu():
    x = torch.rand(24, 1, 16, 16) * 2 - 1
    y = torch.arange(24) % 2
    x[y == 1, :, 4:12, 4:12] = 1.0  # class 1: a bright square
    clf = train_classifier(x, y, 2, steps=60, seed=0, progress=False, device="cuda")
    assert next(clf.parameters()).device.type == "cuda"
    probs = predict_proba(clf, x)
    assert probs.device.type == "cpu" and float((probs.argmax(1) == y).float().mean()) > 0.9
    feats = FeatureExtractor(clf, "t")(x)
    on_cpu = FeatureExtractor(clf.cpu(), "t")(x)
    assert feats.device.type == "cpu" and feats.dtype == torch.float64
    torch.testing.assert_close(feats, on_cpu, atol=1e-3, rtol=1e-3)
