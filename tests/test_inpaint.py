"""Lesion insertion by inpainting (RePaint): outside the region exactly the input, seeded, latent region shapes,
the schedule of jumps, and the share profile refusing outputs that hold a real patient's image."""

import pytest
import torch

from medaug.inpaint import inpaint, inpaint_images, latent_mask, renoise, repaint_schedule
from medaug.latent import LatentSpace
from medaug.model import network_from_spec
from medaug.sampling import inference_scheduler

from .test_flow import FLOW
from .test_latent import AE, UNET
from .test_model import SPEC
from .test_sampling import SCHED


def net(spatial_dims, spec=SPEC):
    torch.manual_seed(0)
    return network_from_spec({**spec, "spatial_dims": spatial_dims}).eval()


def case(spatial_dims, n=3, size=8):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, *[size] * spatial_dims, generator=g) * 2 - 1
    masks = torch.zeros(n, 1, *[size] * spatial_dims, dtype=torch.bool)
    masks[(slice(None), 0, *[slice(2, 5)] * spatial_dims)] = True
    return images, masks, torch.tensor([0, 1, 2][:n])


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("sampler,spec,steps", [("ddim", SCHED, 4), ("rflow", FLOW, 4), ("ddpm", SCHED, 100)])
def test_outside_the_region_is_the_input_and_a_seed_gives_one_output(spatial_dims, sampler, spec, steps):
    images, masks, labels = case(spatial_dims)
    kw = dict(jumps=2, resample=2, guidance_scale=2.0, null_class=3, batch_size=2, progress=False)
    run = [
        inpaint(net(spatial_dims), inference_scheduler(spec, sampler, steps), images, masks, labels, seed=s, **kw)
        for s in (5, 5, 6)
    ]
    assert run[0].shape == images.shape and run[0].min() >= -1 and run[0].max() <= 1
    assert torch.equal(run[0][~masks], images[~masks])  # every voxel outside the region, bit for bit
    assert torch.equal(run[0], run[1])
    assert not torch.equal(run[0][masks], run[2][masks]) and not torch.equal(run[0][masks], images[masks])


def test_repaint_schedule_runs_each_block_resample_times_and_jumps_back_to_its_start():
    plan = repaint_schedule(5, jumps=2, resample=3)
    assert plan == [("step", 0), ("step", 1), ("back", 1)] * 2 + [("step", 0), ("step", 1)] + [
        ("step", 2),
        ("step", 3),
        ("back", 3),
    ] * 2 + [("step", 2), ("step", 3)] + [("step", 4), ("back", 4)] * 2 + [("step", 4)]
    assert repaint_schedule(3, jumps=10, resample=1) == [("step", 0), ("step", 1), ("step", 2)]


@pytest.mark.parametrize("spec,sampler", [(SCHED, "ddim"), (FLOW, "rflow")])
def test_renoise_gives_the_marginal_of_the_later_timestep(spec, sampler):
    """Noising x_t' = a' x0 + b' z up to t must give a_t x0 + (std b_t) noise: checked on x0 = 1."""
    sch = inference_scheduler(spec, sampler, 4)
    t_from, t_to = int(sch.timesteps[-1]), int(sch.timesteps[0])
    from medaug.inpaint import _coefficients

    (a0, b0), (a1, b1) = _coefficients(sch, t_from), _coefficients(sch, t_to)
    g = torch.Generator().manual_seed(0)
    x = a0 + b0 * torch.randn(200_000, generator=g)
    y = renoise(sch, x.view(1, 1, -1, 1), t_from, t_to, g).flatten()
    assert abs(y.mean().item() - a1) < 0.01 and abs(y.std().item() - b1) < 0.01


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_latent_inpainting_regenerates_the_region_on_the_latent_grid(spatial_dims):
    torch.manual_seed(0)
    ae = network_from_spec({**AE, "spatial_dims": spatial_dims}).eval()
    space = LatentSpace(ae, 1.5, 2, [2, *[4] * spatial_dims], None, "ae", image_shape=[8] * spatial_dims)
    images, masks, labels = case(spatial_dims)
    lm = latent_mask(masks, [4] * spatial_dims)
    assert lm.shape == (3, 1, *[4] * spatial_dims) and lm.sum() == 3 * 2**spatial_dims  # voxels 2..4 -> cells 1..2
    seen = []
    model = net(spatial_dims, UNET)
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(tuple(args[0].shape)), with_kwargs=True)
    out = inpaint(
        model,
        inference_scheduler({**SCHED, "clip_sample": False}, "ddim", 3),
        images,
        masks,
        labels,
        space=space,
        jumps=1,
        resample=2,
        guidance_scale=1.0,
        null_class=3,
        seed=0,
        progress=False,
    )
    assert seen and set(seen) == {(3, 2, *[4] * spatial_dims)}  # the UNet ran on latents
    assert out.shape == images.shape and torch.equal(out[~masks], images[~masks])


def test_inpaint_refuses_bad_input():
    images, masks, labels = case(2)
    sch = inference_scheduler(SCHED, "ddim", 2)
    kw = dict(jumps=1, resample=1, guidance_scale=1.0, null_class=3, seed=0, progress=False)
    with pytest.raises(ValueError, match="masks .* must be"):
        inpaint_images(net(2), sch, images, masks[:, :, :4], labels, **kw)
    with pytest.raises(ValueError, match="inpaint.sampler=DPMSolverPP2M keeps a history"):
        inpaint_images(net(2), inference_scheduler(SCHED, "dpmpp_2m", 2), images, masks, labels, **kw)
    with pytest.raises(ValueError, match="inpaint.jumps=0"):
        inpaint_images(net(2), sch, images, masks, labels, **{**kw, "jumps": 0})


def test_inpaint_stage_keeps_geometry_and_every_outside_voxel_and_share_refuses_it(tmp_path):
    import csv
    import json

    import nibabel as nib
    import numpy as np

    from medaug.data import load_split
    from medaug.export import ExportError, export_dataset
    from medaug.io import write_nifti
    from medaug.sampling import load_samples
    from pipelines import inpaint as inpaint_stage
    from pipelines import prepare, train

    from .conftest import TINY, WINDOW, compose_cfg

    overrides = ["experiment=demo_2d", *TINY]
    for stage in (prepare, train):
        stage.run(compose_cfg(stage.__name__.split(".")[-1], tmp_path, overrides))
    x, _ = load_split(tmp_path / "prepared", "train")
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 3.0]
    hu = WINDOW.to_source(x[0, 0].numpy())[:, :, None] + 0.123  # the input in HU, with values no window round-trips
    mask = np.zeros_like(hu)
    mask[4:10, 5:11] = 1
    write_nifti(tmp_path / "img.nii.gz", hu, affine)
    write_nifti(tmp_path / "roi.nii.gz", mask, affine)
    run = [
        *overrides,
        f"sample.inpaint.images=[{tmp_path}/img.nii.gz]",
        f"sample.inpaint.masks=[{tmp_path}/roi.nii.gz]",
        "sample.inpaint.class_name=multi_lesion",
        "sample.inpaint.steps=4",
        "sample.inpaint.jumps=2",
        "sample.inpaint.resample=2",
    ]
    result = inpaint_stage.run(compose_cfg("inpaint", tmp_path, run))
    out = tmp_path / "inpaint"
    assert result["inpainted"] == 1 and result["inpaint_dir"] == str(out)
    img = nib.load(out / "nifti" / "inpaint-0000.nii.gz")
    got = np.asarray(img.dataobj, dtype=np.float32)
    assert got.shape == hu.shape and np.allclose(img.affine, affine)
    assert np.array_equal(got[mask == 0], hu[mask == 0]) and not np.allclose(got[mask == 1], hu[mask == 1])
    images, labels, rows, info = load_samples(out)
    assert rows[0]["contains_real_patient"] == "True" and rows[0]["region_voxels"] == "36"
    assert info["contains_real_patient"] is True and rows[0]["class_name"] == "multi_lesion"
    assert info["sample"]["guidance_scale"] == 3.0  # the inpaint section's guidance, not sample.guidance_scale (2)
    assert "img.nii" not in json.dumps(info) + open(out / "manifest.csv").read()  # no input file names
    assert "contain a real patient's image" in (out / "DATA_CARD.md").read_text()
    assert (out / "picture.png").is_file()
    again = inpaint_stage.run(
        compose_cfg("inpaint", tmp_path / "again", [*run, f"ckpt_path={tmp_path}/train/checkpoints/last.pt"])
    )
    assert torch.equal(load_samples(again["inpaint_dir"])[0], images)  # seeded
    with pytest.raises(ExportError, match="contains_real_patient=true.*share profile refuses them"):
        export_dataset(
            images,
            list(csv.DictReader(open(out / "manifest.csv"))),
            tmp_path / "export",
            window=WINDOW,
            affine=affine,
            card_fields={},
            template=tmp_path / "none.md",
            profile="share",
        )
    with pytest.raises(ValueError, match="class_name='tumour'; choose one of"):
        inpaint_stage.run(compose_cfg("inpaint", tmp_path, [*run, "sample.inpaint.class_name=tumour"]))
