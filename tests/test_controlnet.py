"""A ControlNet on the mask added to a class-conditional checkpoint (medaug.controlnet), 2D and 3D, on tiny data."""

import functools

import numpy as np
import pytest
import torch

from medaug.conditioning import Conditioning, one_hot, training_conditioning
from medaug.controlnet import ControlledUNet, controlnet_spec, init_from_base, load_base
from medaug.data import PreparedInfo
from medaug.model import EMA, checkpoint_network, load_checkpoint, network_from_spec, save_checkpoint
from medaug.preprocessing import IntensityWindow
from medaug.sampling import guided_eps, inference_scheduler, sample_images, sampling_network
from medaug.training import DiffusionStep, TrainSettings, fit

from .test_model import SPEC
from .test_sampling import SCHED

LABELS = {"background": 0, "lesion": 1, "edema": 2}
CLASSES = ["a", "b", "c"]


def masks_of(n, shape, seed=0):
    return torch.randint(0, 3, (n, 1, *shape), generator=torch.Generator().manual_seed(seed))


def info_of(tmp_path, spatial_dims, shape=None, classes=CLASSES):
    shape = list(shape or (8,) * spatial_dims)
    return PreparedInfo(
        tmp_path, spatial_dims, shape, list(classes), IntensityWindow(-1, 1), np.eye(4), mask_labels=dict(LABELS)
    )


def base_checkpoint(path, spatial_dims, meta=None, scheduler=SCHED, seed=0):
    """A class-conditional checkpoint (tiny UNet, 3 classes + null) as train writes one, its zero-initialised
    layers (MONAI's output convolution among them) given weights as training would."""
    spec = {**SPEC, "spatial_dims": spatial_dims}
    torch.manual_seed(seed)
    net = network_from_spec(spec)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    meta = {"class_names": CLASSES, "image_shape": [8] * spatial_dims, "spatial_dims": spatial_dims, **(meta or {})}
    config = {"model": spec, "scheduler": scheduler}
    save_checkpoint(path, model=net, ema=EMA(net), optimizer=None, step=7, config=config, meta=meta)
    return load_checkpoint(path)


def controlled(base, scale=1.0):
    torch.manual_seed(1)
    spec = controlnet_spec(base, mask_channels=3, embedding_channels=8, conditioning_scale=scale)
    return init_from_base(network_from_spec(spec), base), spec


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_at_initialisation_the_pair_predicts_what_the_base_unet_predicts(tmp_path, spatial_dims):
    base = base_checkpoint(tmp_path / "base.pt", spatial_dims)
    net, spec = controlled(base)
    assert isinstance(net, ControlledUNet) and spec["unet"]["num_class_embeds"] == 4
    assert not any(p.requires_grad for p in net.unet.parameters())
    assert all(p.requires_grad for p in net.controlnet.parameters())
    unet = checkpoint_network(base)  # the base's EMA weights
    # the ControlNet's encoder starts as a copy of the UNet's (every name and shape that match)
    for name, value in unet.state_dict().items():
        if name in net.controlnet.state_dict() and not name.startswith("controlnet_"):
            assert torch.equal(net.controlnet.state_dict()[name], value), name
    shape = (8,) * spatial_dims
    x, t, y = torch.randn(3, 1, *shape), torch.tensor([0, 40, 99]), torch.tensor([0, 2, 3])
    hot = one_hot(masks_of(3, shape), 3)
    with torch.no_grad():
        expected = unet(x, timesteps=t, class_labels=y)
        assert torch.equal(net(torch.cat([x, hot], 1), timesteps=t, class_labels=y), expected)  # zero convolutions
    net.train()
    assert net.controlnet.training and not net.unet.training  # the frozen UNet stays in eval mode


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_training_changes_only_the_controlnet_and_sampling_is_seeded_and_follows_the_mask(tmp_path, spatial_dims):
    base = base_checkpoint(tmp_path / "base.pt", spatial_dims)
    net, spec = controlled(base)
    unet_before = {k: v.clone() for k, v in net.unet.state_dict().items()}
    cn_before = {k: v.clone() for k, v in net.controlnet.state_dict().items()}
    cond = training_conditioning({"condition": "controlnet"}, num_classes=3, mask_labels=LABELS, latent=False)
    assert cond.kind == "controlnet" and cond.use_class and cond.mask_channels == 3
    shape = (8,) * spatial_dims
    images, labels, masks = torch.rand(8, 1, *shape) * 2 - 1, torch.arange(8) % 3, masks_of(8, shape)
    ema = EMA(net)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], 1e-2)
    step = DiffusionStep(net, network_from_spec(SCHED), images, labels, null_class=3, masks=masks, conditioning=cond)
    fit(
        net,
        ema,
        opt,
        step,
        TrainSettings(max_steps=4, batch_size=4, log_every=2),
        ckpt_path=tmp_path / "cn.pt",
        checkpoint_payload=lambda: {
            "config": {"model": spec, "scheduler": SCHED},
            "meta": {**base.meta, **cond.meta()},
        },
    )
    for name, value in net.unet.state_dict().items():
        assert torch.equal(value, unet_before[name]), name  # bit-identical
    changed = [k for k, v in net.controlnet.state_dict().items() if not torch.equal(v, cn_before[k])]
    assert "controlnet_mid_block.conv.weight" in changed and "conv_in.conv.weight" in changed
    ckpt = load_checkpoint(tmp_path / "cn.pt")  # weights_only; builds only medaug.controlnet.ControlledUNet
    assert Conditioning.from_meta(ckpt.meta) == cond and ckpt.meta["condition"]["kind"] == "controlnet"
    assert ckpt.config["model"]["_target_"] == "medaug.controlnet.ControlledUNet"
    assert {k.split(".")[0] for k in ckpt.model} == {"unet", "controlnet"}  # self-contained: the base UNet too
    for name, value in unet_before.items():  # the EMA of a frozen weight is the weight
        assert torch.equal(ckpt.ema["model"][f"unet.{name}"], value)
    with pytest.raises(ValueError, match=r"cn.pt is conditioned on masks \(controlnet\); here only class-cond"):
        sampling_network(ckpt, "cpu")  # augment, inpaint, ...: class -> image callers
    sampler = sampling_network(ckpt, "cpu", conditioned=True)
    assert torch.equal(
        sampler.controlnet.controlnet_mid_block.conv.weight, ema.model.controlnet.controlnet_mid_block.conv.weight
    )
    kw = dict(guidance_scale=2.0, null_class=3, progress=False, conditioning=cond)
    y, m = torch.tensor([0, 1, 2]), masks_of(3, shape, seed=1)
    for name in ("ddim", "pndm", "dpmpp_2m", "dpmpp_2m_sde"):  # every sampler of a class model (ddpm: as ddim)
        a, b = (
            sample_images(sampler, inference_scheduler(SCHED, name, 3), y, shape, seed=5, masks=m, **kw) for _ in "ab"
        )
        assert a.shape == (3, 1, *shape) and a.min() >= -1 and a.max() <= 1
        assert torch.equal(a, b), name  # the same seed, labels and masks: the same samples
    b = sample_images(sampler, inference_scheduler(SCHED, "ddim", 3), y, shape, seed=5, masks=m, batch_size=2, **kw)
    c = sample_images(
        sampler, inference_scheduler(SCHED, "ddim", 3), y, shape, seed=5, masks=masks_of(3, shape, 2), **kw
    )
    a = sample_images(sampler, inference_scheduler(SCHED, "ddim", 3), y, shape, seed=5, masks=m, **kw)
    assert torch.equal(a, b)  # whatever the batch
    assert not torch.equal(a, c)  # the mask is used


def test_guidance_drops_class_and_mask_together_in_training_and_sampling(tmp_path):
    base = base_checkpoint(tmp_path / "base.pt", 2)
    net, _ = controlled(base)
    torch.nn.init.normal_(net.controlnet.controlnet_mid_block.conv.weight)  # as if trained: the mask matters
    torch.nn.init.normal_(net.controlnet.controlnet_cond_embedding.conv_out.conv.weight)
    seen = []
    net.controlnet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    cond = Conditioning(True, LABELS, controlnet=True)
    images, labels, masks = torch.zeros(64, 1, 8, 8), torch.ones(64, dtype=torch.long), masks_of(64, (8, 8))
    step = DiffusionStep(
        net, network_from_spec(SCHED), images, labels, null_class=3, p_uncond=0.5, masks=masks, conditioning=cond
    )
    from medaug.training import StepDraw, step_generator

    g = step_generator(0, 1)
    step(StepDraw(1, torch.arange(64), 64, slice(None), g, g))
    hot, y = seen[0]["controlnet_cond"], seen[0]["class_labels"]
    dropped = y == 3
    assert 10 < int(dropped.sum()) < 54
    assert torch.all(hot[dropped] == 0) and torch.all(hot[~dropped].sum(1) == 1)  # null class with all-zero mask
    x, y, hot = torch.randn(2, 1, 8, 8), torch.tensor([0, 2]), one_hot(masks_of(2, (8, 8)), 3)
    t = torch.full((2,), 10)
    with torch.no_grad():
        eps_c = net(torch.cat([x, hot], 1), timesteps=t, class_labels=y)
        eps_u = net(torch.cat([x, torch.zeros_like(hot)], 1), timesteps=t, class_labels=torch.full_like(y, 3))
        torch.testing.assert_close(guided_eps(net, x, 10, y, 1.0, 3, hot), eps_c)
        torch.testing.assert_close(guided_eps(net, x, 10, y, 3.0, 3, hot), eps_u + 3.0 * (eps_c - eps_u))
    assert not torch.allclose(eps_c, eps_u)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_latent_model_takes_the_mask_on_the_latent_grid(tmp_path, spatial_dims):
    """Latents on a 4^d grid of 8^d images: the ControlNet's conditioning is the area-resized one-hot (label
    shares per cell), and its embedding lands on the latent grid."""
    base = base_checkpoint(tmp_path / "base.pt", spatial_dims)
    net, _ = controlled(base)
    seen = []
    net.controlnet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["controlnet_cond"]), with_kwargs=True)
    embedded = []
    net.controlnet.controlnet_cond_embedding.register_forward_hook(lambda m, a, out: embedded.append(out.shape))
    masks = masks_of(2, (8,) * spatial_dims)
    cond = Conditioning(True, LABELS, controlnet=True)
    latent = (4,) * spatial_dims
    z = sample_images(
        net,
        inference_scheduler(SCHED, "ddim", 2),
        torch.tensor([0, 1]),
        latent,
        guidance_scale=1.0,
        null_class=3,
        seed=0,
        masks=masks,
        conditioning=cond,
        progress=False,
        clip=False,
    )
    assert z.shape == (2, 1, *latent)
    assert seen[0].shape == (2, 3, *latent) and torch.allclose(seen[0].sum(1), torch.ones(2, *latent))
    assert torch.allclose(seen[0], cond.one_hot(masks, grid=latent))
    assert embedded[0] == (2, 8, *latent)  # channels[0] of the UNet, on its input grid


def test_base_checkpoints_that_cannot_carry_a_controlnet_are_refused_in_one_line(tmp_path):
    info = info_of(tmp_path, 2)
    with pytest.raises(ValueError, match="model.condition=controlnet needs model.controlnet.base_ckpt"):
        load_base(None, info)
    missing = tmp_path / "nowhere" / "last.pt"
    with pytest.raises(FileNotFoundError, match=f"model.controlnet.base_ckpt={missing}: not found") as err:
        load_base(missing, info)
    assert "\n" not in str(err.value)
    masked = tmp_path / "masked.pt"
    base_checkpoint(masked, 2, meta=Conditioning(True, LABELS).meta())
    with pytest.raises(ValueError, match=f"base_ckpt={masked} is conditioned on mask\\+class generating image; a Con"):
        load_base(masked, info)
    good = tmp_path / "base.pt"
    base_checkpoint(good, 2)
    assert load_base(good, info, scheduler=SCHED).step == 7
    with pytest.raises(ValueError, match=f"base_ckpt={good} was trained with class_names \\['a', 'b', 'c'\\], but"):
        load_base(good, info_of(tmp_path, 2, classes=["a", "b"]))
    with pytest.raises(ValueError, match="trained with image_shape \\[8, 8\\], but .* has \\[16, 16\\]"):
        load_base(good, info_of(tmp_path, 2, shape=(16, 16)))
    with pytest.raises(ValueError, match="was trained on pixels, but this run trains on the latents of autoencoder"):
        load_base(good, info, space=type("Space", (), {"id": "abc"})())
    with pytest.raises(ValueError, match="trained with scheduler prediction_type=None, this run has v_prediction"):
        load_base(good, info, scheduler={**SCHED, "prediction_type": "v_prediction"})


@pytest.mark.slow
def test_stage_recipes_base_then_controlnet_then_pairs_on_real_masks(tmp_path):
    """train a class model, then a ControlNet on it in another train_dir, then `sample` on the val masks."""
    from medaug.data import load_split_masks
    from medaug.sampling import load_sample_masks, load_samples
    from pipelines import prepare, sample, train

    from .conftest import TINY, compose_cfg

    job = ["experiment=demo_2d", *TINY, "data.demo.size=12", "data.image_size=[12,12]"]
    prepare.run(compose_cfg("prepare", tmp_path, job))
    train.run(compose_cfg("train", tmp_path, job))
    base = tmp_path / "train" / "checkpoints" / "last.pt"
    cn = [*job, "model.condition=controlnet", f"model.controlnet.base_ckpt={base}", f"paths.train_dir={tmp_path}/cn"]
    with pytest.raises(ValueError, match="is this run's own checkpoint, which the ControlNet run would overwrite"):
        train.run(compose_cfg("train", tmp_path, [*cn, f"paths.train_dir={tmp_path}/train"]))
    with pytest.raises(ValueError, match="training.dp.enabled=true does not work with model.condition=controlnet"):
        train.run(compose_cfg("train", tmp_path, [*cn, "training.dp.enabled=true", "training.dp.noise_multiplier=1"]))
    result = train.run(compose_cfg("train", tmp_path, cn))
    ckpt = load_checkpoint(result["checkpoint"])
    assert ckpt.meta["condition"]["kind"] == "controlnet" and ckpt.step == 4
    assert ckpt.config["model"]["_base"]["id"] == load_checkpoint(base).id
    base_unet = load_checkpoint(base).ema["model"]
    assert all(torch.equal(ckpt.model[f"unet.{k}"], v) for k, v in base_unet.items())  # frozen: the base's weights
    out = sample.run(compose_cfg("sample", tmp_path, [*cn, "sample.masks=prepared:val", "sample.sampler=ddim"]))
    images, labels, rows, info = load_samples(out["samples_dir"])
    masks = load_sample_masks(out["samples_dir"])
    assert images.shape == (len(labels), 1, 12, 12) and torch.equal(
        masks, load_split_masks(tmp_path / "prepared", "val")
    )
    assert rows[0]["mask_source"] == "real" and info["condition"]["kind"] == "controlnet"
    resumed = train.run(compose_cfg("train", tmp_path, [*cn, "training.max_steps=6"]))  # resumes the ControlNet run
    assert (
        resumed["train/step"] == 6 and load_checkpoint(resumed["checkpoint"]).meta["condition"]["kind"] == "controlnet"
    )


@pytest.mark.slow
def test_latent_3d_controlnet_on_a_latent_class_model(tmp_path):
    """3D latent diffusion: a class model on autoencoder latents, a ControlNet on it (the mask on the latent
    grid), pairs on the val masks; a base of another space is refused."""
    from medaug.data import load_split_masks
    from medaug.sampling import load_sample_masks, load_samples
    from pipelines import prepare, sample, train

    from .conftest import TINY, compose_cfg

    job = ["experiment=ldm_3d_demo", *TINY, "autoencoder.max_steps=4", "data.demo.size=12"]
    job += ["data.image_size=[12,12,12]", "model=unet_tiny"]
    prepare.run(compose_cfg("prepare", tmp_path, job))
    train.run(compose_cfg("train", tmp_path, job))
    base = tmp_path / "train" / "checkpoints" / "last.pt"
    cn = [*job, "model.condition=controlnet", f"model.controlnet.base_ckpt={base}", f"paths.train_dir={tmp_path}/cn"]
    with pytest.raises(ValueError, match="was trained on the latents of autoencoder .*, but this run trains on pixels"):
        train.run(compose_cfg("train", tmp_path, [*cn, "latent.autoencoder_ckpt=null"]))
    train.run(compose_cfg("train", tmp_path, cn))
    ckpt = load_checkpoint(tmp_path / "cn" / "checkpoints" / "last.pt")
    assert ckpt.meta["latent"]["autoencoder_id"] == load_checkpoint(base).meta["latent"]["autoencoder_id"]
    out = sample.run(compose_cfg("sample", tmp_path, [*cn, "sample.masks=prepared:val", "sample.steps=2"]))
    images, labels, rows, _ = load_samples(out["samples_dir"])
    assert images.shape == (len(labels), 1, 12, 12, 12)
    assert torch.equal(load_sample_masks(out["samples_dir"]), load_split_masks(tmp_path / "prepared", "val"))


@pytest.mark.slow
def test_ddp_two_cpu_ranks_train_the_controlnet_as_one_process_with_double_batch(tmp_path):
    import os
    import subprocess
    import sys

    from pipelines import prepare, train

    from .conftest import CONF_DIR, TINY, compose_cfg

    job = ["experiment=demo_2d", *TINY, f"paths.output_dir={tmp_path}", "training.grad_clip=null"]
    prepare.run(compose_cfg("prepare", tmp_path, job))
    base = train.run(compose_cfg("train", tmp_path, job))["checkpoint"]
    cn = [*job, "training.max_steps=3", "model.condition=controlnet", f"model.controlnet.base_ckpt={base}"]
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pipelines.train"]
        + [*cn, "training.batch_size=2", f"paths.train_dir={tmp_path}/ddp"],
        cwd=CONF_DIR.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    train.run(compose_cfg("train", tmp_path, [*cn, "training.batch_size=4", f"paths.train_dir={tmp_path}/one"]))
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    assert ddp.step == one.step == 3
    for name, w in one.model.items():  # float sums in another order: ~1e-5 apart (see test_pipelines' DDP test)
        torch.testing.assert_close(ddp.model[name], w, atol=1e-4, rtol=1e-3)
    unet = load_checkpoint(base).ema["model"]
    assert all(torch.equal(ddp.model[f"unet.{k}"], v) for k, v in unet.items())  # frozen on every rank
    assert float(one.model["controlnet.controlnet_mid_block.conv.weight"].abs().max()) > 1e-3  # moved from zero


def test_activation_checkpointing_reaches_both_networks_and_keeps_the_gradients(tmp_path):
    from medaug.training import diffusion_loss, prepare_for_speed, step_generator

    base = base_checkpoint(tmp_path / "base.pt", 2)
    x, y, hot = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0]), one_hot(masks_of(4, (8, 8)), 3)
    grads = []
    for switch in (False, True):
        net, _ = controlled(base)
        model = prepare_for_speed(net, activation_checkpointing=switch)
        loss = diffusion_loss(
            model, network_from_spec(SCHED), x, y, null_class=3, generator=step_generator(0, 0), mask_onehot=hot
        )
        loss.mean().backward()
        grads.append({k: p.grad.clone() for k, p in net.named_parameters() if p.requires_grad})
        assert all(p.grad is None for p in net.unet.parameters())  # frozen: no gradients kept
        recomputed = [isinstance(n.middle_block.forward, functools.partial) for n in (net.unet, net.controlnet)]
        assert recomputed == [switch, switch]
    assert set(grads[0]) == set(grads[1]) and any(g.abs().sum() > 0 for g in grads[0].values())
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5)
