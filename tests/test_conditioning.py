"""Mask-conditioned training and sampling (medaug.conditioning), 2D and 3D, on tiny data."""

import pytest
import torch

from medaug.conditioning import (
    Conditioning,
    image_to_mask,
    mask_to_image,
    one_hot,
    training_conditioning,
)
from medaug.model import EMA, load_checkpoint, network_from_spec
from medaug.sampling import generate_sharded, guided_eps, inference_scheduler, sample_images, sampling_network
from medaug.training import DiffusionStep, TrainSettings, diffusion_loss, fit, step_generator

from .test_model import SPEC
from .test_sampling import SCHED

LABELS = {"background": 0, "lesion": 1, "edema": 2}


def masks_of(n, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (n, 1, *shape), generator=g)


def conditioned_net(spatial_dims, kind="mask+class"):
    spec = {**SPEC, "spatial_dims": spatial_dims, "condition": kind}
    cond = training_conditioning(spec, num_classes=3, mask_labels=LABELS, latent=False)
    torch.manual_seed(0)
    return network_from_spec(spec).eval(), cond, spec


def test_one_hot_round_trip_and_refusal():
    masks = masks_of(2, (4, 4))
    hot = one_hot(masks, 3)
    assert hot.shape == (2, 3, 4, 4) and torch.equal(hot.sum(1), torch.ones(2, 4, 4))
    assert torch.equal(image_to_mask(mask_to_image(masks, 3)), masks)
    assert mask_to_image(masks, 3).min() == -1 and mask_to_image(masks, 3).max() == 1
    with pytest.raises(ValueError, match=r"mask values 0\.\.2 outside the model's labels 0\.\.1"):
        one_hot(masks, 2)


def test_training_conditioning_sets_the_spec_and_refuses_what_cannot_work():
    spec = {**SPEC, "condition": "mask+class"}
    cond = training_conditioning(spec, num_classes=3, mask_labels=LABELS, latent=False)
    assert (spec["in_channels"], spec["out_channels"], spec["num_class_embeds"]) == (1 + 3, 1, 4)
    assert cond.kind == "mask+class" and cond.mask_channels == 3
    assert Conditioning.from_meta(cond.meta()) == cond and Conditioning.from_meta({}) == Conditioning()
    spec = {**SPEC, "condition": "mask"}
    assert not training_conditioning(spec, num_classes=3, mask_labels=LABELS, latent=False).use_class
    assert spec["num_class_embeds"] is None
    spec = {**SPEC, "generates": "mask"}
    cond = training_conditioning(spec, num_classes=3, mask_labels=LABELS, latent=False)
    assert (spec["in_channels"], spec["out_channels"], cond.generates) == (3, 3, "mask")
    spec = {**SPEC}
    assert training_conditioning(spec, num_classes=3, mask_labels=LABELS, latent=False) == Conditioning()
    assert spec["in_channels"] == 1  # class only: the spec as before
    with pytest.raises(ValueError, match="needs masks, but the prepared dataset has none"):
        training_conditioning({**SPEC, "condition": "mask"}, num_classes=3, mask_labels={}, latent=False)
    with pytest.raises(ValueError, match="a mask model \\(model.generates=mask\\) trains on pixels"):
        training_conditioning({**SPEC, "generates": "mask"}, num_classes=3, mask_labels=LABELS, latent=True)
    with pytest.raises(ValueError, match="model.condition='masks'; choose one of class, mask, mask\\+class"):
        training_conditioning({**SPEC, "condition": "masks"}, num_classes=3, mask_labels=LABELS, latent=False)


def test_loss_gives_the_mask_beside_the_noisy_image_and_drops_it_with_the_class():
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, timesteps, class_labels):
            seen.append((x.clone(), class_labels.clone()))
            return x[:, :1]

    sch = network_from_spec(SCHED)
    x, y = torch.zeros(64, 1, 4, 4), torch.ones(64, dtype=torch.long)
    hot = one_hot(masks_of(64, (4, 4)), 3)
    diffusion_loss(Spy(), sch, x, y, null_class=3, p_uncond=0.5, generator=step_generator(0, 1), mask_onehot=hot)
    inputs, labels = seen[0]
    assert inputs.shape == (64, 4, 4, 4)
    dropped = labels == 3
    assert 10 < int(dropped.sum()) < 54
    assert torch.all(inputs[dropped, 1:] == 0)  # dropped jointly: null class and an all-zero mask
    assert torch.equal(inputs[~dropped, 1:], hot[~dropped])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mask_conditioned_training_and_sampling_are_seeded_and_follow_the_mask(tmp_path, spatial_dims):
    net, cond, spec = conditioned_net(spatial_dims)
    shape = (8,) * spatial_dims
    images, labels, masks = torch.rand(8, 1, *shape) * 2 - 1, torch.arange(8) % 3, masks_of(8, shape)
    ema = EMA(net)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    step = DiffusionStep(net, network_from_spec(SCHED), images, labels, null_class=3, masks=masks, conditioning=cond)
    result = fit(
        net,
        ema,
        opt,
        step,
        TrainSettings(max_steps=3, batch_size=4, log_every=1),
        ckpt_path=tmp_path / "c.pt",
        checkpoint_payload=lambda: {"config": {"model": spec, "scheduler": SCHED}, "meta": cond.meta()},
    )
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(v)) for _, v in result.losses)
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert Conditioning.from_meta(ckpt.meta) == cond
    with pytest.raises(ValueError, match=r"c.pt is conditioned on masks \(mask\+class\); here only class-cond"):
        sampling_network(ckpt, "cpu")  # augment, inpaint, ...: class -> image callers
    sampler = sampling_network(ckpt, "cpu", conditioned=True)  # rebuilt from the spec: `condition` is no argument
    kw = dict(guidance_scale=2.0, null_class=3, progress=False, conditioning=cond)
    y, m = torch.tensor([0, 1, 2]), masks_of(3, shape, seed=1)
    a = sample_images(sampler, inference_scheduler(SCHED, "ddim", 3), y, shape, seed=5, masks=m, batch_size=3, **kw)
    b = sample_images(sampler, inference_scheduler(SCHED, "ddim", 3), y, shape, seed=5, masks=m, batch_size=2, **kw)
    c = sample_images(
        sampler, inference_scheduler(SCHED, "ddim", 3), y, shape, seed=5, masks=masks_of(3, shape, 2), **kw
    )
    assert a.shape == (3, 1, *shape) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)  # the same seed, labels and masks: the same samples, whatever the batch
    assert not torch.equal(a, c)  # the mask is used
    with pytest.raises(ValueError, match="needs one mask per sample"):
        sample_images(sampler, inference_scheduler(SCHED, "ddim", 3), y, shape, seed=5, **kw)


def test_guidance_combines_the_mask_and_class_prediction_with_the_unconditional_one():
    net, cond, _ = conditioned_net(2)
    x, y, hot = torch.randn(2, 1, 8, 8), torch.tensor([0, 2]), one_hot(masks_of(2, (8, 8)), 3)
    t = torch.full((2,), 10)
    with torch.no_grad():
        eps_c = net(torch.cat([x, hot], 1), timesteps=t, class_labels=y)
        eps_u = net(torch.cat([x, torch.zeros_like(hot)], 1), timesteps=t, class_labels=torch.full_like(y, 3))
        torch.testing.assert_close(guided_eps(net, x, 10, y, 1.0, 3, hot), eps_c)
        torch.testing.assert_close(guided_eps(net, x, 10, y, 3.0, 3, hot), eps_u + 3.0 * (eps_c - eps_u))
    mask_only, cond, _ = conditioned_net(2, "mask")
    with torch.no_grad():  # no class input at all
        out = sample_images(
            mask_only,
            inference_scheduler(SCHED, "ddim", 2),
            y,
            (8, 8),
            guidance_scale=2.0,
            null_class=3,
            seed=0,
            masks=masks_of(2, (8, 8)),
            conditioning=cond,
            progress=False,
        )
    assert out.shape == (2, 1, 8, 8)


def test_generate_sharded_hands_out_masks_and_gathers_pairs():
    labels, masks = torch.arange(5), torch.arange(5).view(5, 1, 1, 1)

    def generate(chunk, seed, m):
        return chunk.float().view(-1, 1, 1, 1) + seed * 0, m * 10

    images, got = generate_sharded(generate, labels, 2, 0, masks=masks)
    assert images.flatten().tolist() == [0, 1, 2, 3, 4] and got.flatten().tolist() == [0, 10, 20, 30, 40]


def test_one_hot_on_a_latent_grid_gives_each_cell_its_label_shares():
    cond = Conditioning(True, LABELS)
    masks = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    masks[0, 0, :2, :1] = 1  # half of the top-left 2x2 cell
    hot = cond.one_hot(masks, grid=(2, 2))
    assert hot.shape == (1, 3, 2, 2) and torch.allclose(hot.sum(1), torch.ones(1, 2, 2))
    assert hot[0, 1, 0, 0] == 0.5 and hot[0, 0, 0, 0] == 0.5 and hot[0, 0, 1, 1] == 1
