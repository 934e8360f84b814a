"""Latent diffusion: autoencoder round trips, training, scale factor, latent cache, LDM sampling and export."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import medaug.latent as latent
from medaug.data import load_info, load_split
from medaug.latent import (
    ENCODE_OVERLAP,
    AutoencoderSettings,
    AutoencoderStep,
    Optimizers,
    cache_file,
    cached_latents,
    check_shape,
    check_tile,
    decode_latents,
    encode_mean,
    kl_loss,
    latent_space_for_training,
    load_latent_space,
    reconstruction_metrics,
    train_autoencoder,
)
from medaug.model import EMA, load_checkpoint, network_from_spec
from medaug.sampling import inference_scheduler, labels_for_counts, load_samples
from medaug.training import fit
from pipelines import export, prepare, sample, train, train_autoencoder as train_autoencoder_stage

from .conftest import CONF_DIR, TINY, compose_cfg

AE = {
    "_target_": "monai.networks.nets.AutoencoderKL",
    "in_channels": 1,
    "out_channels": 1,
    "channels": [8, 8],
    "latent_channels": 2,
    "num_res_blocks": 1,
    "attention_levels": [False, False],
    "norm_num_groups": 4,
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
}
UNET = {
    "_target_": "monai.networks.nets.DiffusionModelUNet",
    "in_channels": 2,
    "out_channels": 2,
    "channels": [8, 8],
    "attention_levels": [False, False],
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 8,
    "num_class_embeds": 4,
}
SCHED = {
    "_target_": "monai.networks.schedulers.DDPMScheduler",
    "num_train_timesteps": 100,
    "schedule": "linear_beta",
    "clip_sample": False,
}
SECTION = {
    "network": {**AE, "spatial_dims": 3},
    "discriminator": None,
    "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-3},
    "disc_optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-3},
    "kl_weight": 1e-6,
    "adv_weight": 0.01,
    "adv_start": 0,
    "max_steps": 3,
    "batch_size": 4,
    "ema_decay": 0.9,
    "ckpt_every": 0,
    "log_every": 1,
    "val_every": 0,
    "seed": 0,
}
REPO = CONF_DIR.parent
LDM = [
    "experiment=ldm_3d_demo",
    *TINY,
    "autoencoder=kl_tiny",
    "autoencoder.max_steps=4",
    "data.demo.size=12",
    "data.image_size=[12,12,12]",
]


def autoencoder(spatial_dims):
    torch.manual_seed(0)
    return network_from_spec({**AE, "spatial_dims": spatial_dims}).eval()


def blobs(spatial_dims, n=8, size=8):
    """Smooth random images in [-1, 1]: easy to reconstruct."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 1, *([2] * spatial_dims), generator=g)
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    return torch.nn.functional.interpolate(coarse, size=[size] * spatial_dims, mode=mode) * 2 - 1


def fit_ae(ae, ema, opts, images, settings, val_images=None, **kwargs):
    """The autoencoder trained by ``training.fit`` as ``train_autoencoder`` trains it."""
    validate = (
        None
        if val_images is None
        else (lambda: reconstruction_metrics(ema.model, val_images, settings.batch_size, settings.encode_tile)[0])
    )
    return fit(
        ae,
        ema,
        opts,
        AutoencoderStep(ae, images, settings, opts),
        settings.train_settings(),
        validate=validate,
        **kwargs,
    )


@pytest.fixture(scope="module")
def trained(prepared_3d, tmp_path_factory):
    """A tiny autoencoder trained 3 steps on the 12³ phantoms: (result, cache_dir)."""
    out = tmp_path_factory.mktemp("ae")
    result = train_autoencoder(SECTION, prepared_3d, out / "ae.pt", out / "latents")
    return result, out / "latents"


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_round_trip_shapes(spatial_dims):
    ae, x = autoencoder(spatial_dims), blobs(spatial_dims, n=3)
    z = encode_mean(ae, x, batch_size=2)
    assert z.shape == (3, 2, *([4] * spatial_dims)) and z.dtype == torch.float32
    back = decode_latents(ae, z, batch_size=2)
    assert back.shape == x.shape and back.min() >= -1 and back.max() <= 1
    metrics, recon = reconstruction_metrics(ae, x, batch_size=2)
    assert torch.equal(recon, back)
    assert set(metrics) == {"autoencoder/val_l1", "autoencoder/val_psnr", "autoencoder/val_ssim"}
    assert metrics["autoencoder/val_l1"] == pytest.approx(float((back - x).abs().mean()))
    assert metrics["autoencoder/val_ssim"] <= 1 and np.isfinite(metrics["autoencoder/val_psnr"])


def test_latent_shape_must_divide_by_compression():
    assert check_shape([12, 16, 8], {"channels": [8, 8, 8]}) == [3, 4, 2]
    with pytest.raises(ValueError, match="multiples of 4"):
        check_shape([12, 10, 8], {"channels": [8, 8, 8]})


def test_kl_is_zero_for_the_prior_and_per_sample():
    mu, sigma = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert torch.equal(kl_loss(mu, sigma), torch.zeros(2))
    kl = kl_loss(mu + torch.tensor([0.0, 1.0]).view(2, 1, 1, 1), sigma)
    assert kl.shape == (2,) and kl[0] == 0 and kl[1] == pytest.approx(0.5 * 3 * 16)


def test_fit_learns_and_switches_adversarial_on_after_warm_up():
    x = blobs(2, n=8)
    runs = []
    for _ in range(2):
        ae = autoencoder(2).train()
        torch.manual_seed(1)
        disc = network_from_spec(
            {
                "_target_": "monai.networks.nets.PatchDiscriminator",
                "spatial_dims": 2,
                "in_channels": 1,
                "channels": 8,
                "num_layers_d": 1,
                "norm": "INSTANCE",
            }
        )
        opts = Optimizers(torch.optim.Adam(ae.parameters(), 3e-3), disc, torch.optim.Adam(disc.parameters(), 1e-3))
        settings = AutoencoderSettings(max_steps=24, batch_size=8, adv_start=18, log_every=6, val_every=12)
        runs.append(fit_ae(ae, EMA(ae, 0.9), opts, x, settings, val_images=x[:2]))
    losses = runs[0].terms
    assert [s for s, _ in losses] == [6, 12, 18, 24]
    assert all("autoencoder/disc" not in m for _, m in losses[:3]) and "autoencoder/disc" in losses[3][1]
    assert losses[-1][1]["autoencoder/recon_l1"] < 0.7 * losses[0][1]["autoencoder/recon_l1"]
    assert [s for s, _ in runs[0].val] == [12]
    assert losses == runs[1].terms  # seeded by (seed, step): same run, same curve


def test_scale_factor_stored_and_used(trained, prepared_3d):
    result, cache_dir = trained
    ckpt = load_checkpoint(result.path)
    assert ckpt.meta["kind"] == "autoencoder" and ckpt.meta["latent_shape"] == [6, 6, 6]
    assert ckpt.meta["scale_factor"] == result.scale_factor
    assert set(ckpt.meta["val"]) == {"autoencoder/val_l1", "autoencoder/val_psnr", "autoencoder/val_ssim"}
    space = load_latent_space(result.path)
    images, _ = load_split(prepared_3d, "train")
    means = encode_mean(space.autoencoder, images)
    assert result.scale_factor == pytest.approx(1 / float(means.std()), rel=1e-4)
    scaled = space.encode(images)
    assert float(scaled.std()) == pytest.approx(1.0, rel=1e-4)
    torch.testing.assert_close(space.decode(scaled), decode_latents(space.autoencoder, means))
    assert (result.path.parent / "reconstructions.png").is_file()


def test_latent_cache_written_once_and_reused(trained, prepared_3d, monkeypatch, tmp_path):
    result, cache_dir = trained
    space = load_latent_space(result.path)
    info = load_info(prepared_3d)
    path = cache_file(cache_dir, result.id, info.fingerprint, "train")
    assert path.is_file()  # written by train_autoencoder from the means it computed the scale factor on
    calls = []
    real_encode = latent.encode_mean
    monkeypatch.setattr(latent.space, "encode_mean", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    z, y = cached_latents(space, prepared_3d, cache_dir)
    assert calls == [] and z.shape[1:] == (2, 6, 6, 6) and torch.equal(y, load_split(prepared_3d, "train")[1])
    fresh = tmp_path / "other_cache"
    first = cached_latents(space, prepared_3d, fresh)
    second = cached_latents(space, prepared_3d, fresh)
    assert calls == [1] and torch.equal(first[0], second[0])
    torch.testing.assert_close(first[0], z)


def test_finished_autoencoder_is_not_retrained(trained, prepared_3d):
    result, cache_dir = trained
    again = train_autoencoder(SECTION, prepared_3d, result.path, cache_dir)
    assert again.id == result.id and again.step == 3


def test_ldm_sampling_shape_determinism_and_unclamped_latents(trained, monkeypatch):
    result, _ = trained
    space = load_latent_space(result.path)
    torch.manual_seed(0)
    net = network_from_spec({**UNET, "spatial_dims": 3}).eval()
    labels = labels_for_counts({0: 2, 2: 1})
    kw = dict(guidance_scale=2.0, null_class=3, batch_size=2, progress=False)
    a = space.sample(net, inference_scheduler(SCHED, "ddim", 3), labels, seed=0, **kw)
    b = space.sample(net, inference_scheduler(SCHED, "ddim", 3), labels, seed=0, **kw)
    c = space.sample(net, inference_scheduler(SCHED, "dpmpp_2m_sde", 3), labels, seed=1, **kw)
    assert a.shape == (3, 1, 12, 12, 12) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    seen = []
    monkeypatch.setattr(space, "decode", lambda z, **k: seen.append(z) or z)
    space.sample(net, inference_scheduler(SCHED, "ddim", 3), labels, seed=0, **kw)
    assert seen[0].shape == (3, 2, 6, 6, 6) and seen[0].abs().max() > 1  # unit-variance latents are not clipped


class NearestDecoder(torch.nn.Module):
    """A purely local 'autoencoder' (2x nearest upsampling of channel 0; its encoder: 2x2x2 means into two
    channels): tiling must not change its output."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def decode(self, z):
        return torch.nn.functional.interpolate(z[:, :1] * self.w, scale_factor=2, mode="nearest")

    def encode(self, x):
        mean = torch.nn.functional.avg_pool3d(x, 2) * self.w
        return torch.cat([mean, -mean], 1), torch.ones_like(mean).repeat(1, 2, 1, 1, 1)


def test_tiled_decode_places_and_blends_tiles_exactly():
    z = torch.rand(2, 2, 8, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole = decode_latents(NearestDecoder(), z)
    tiled = decode_latents(NearestDecoder(), z, tile=[6, 6, 6], overlap=0.5, batch_size=1)
    assert tiled.shape == (2, 1, 16, 16, 16)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)
    ae = autoencoder(3)  # a real decoder: same shape, whole-volume result when one tile covers it all
    torch.testing.assert_close(decode_latents(ae, z, tile=[8, 8, 8]), decode_latents(ae, z))
    assert decode_latents(ae, z, tile=[4, 4, 4]).shape == (2, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="decode_tile"):
        decode_latents(ae, z, tile=[6, 6])


def test_tiled_encode_places_and_blends_tiles_exactly():
    x = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole = encode_mean(NearestDecoder(), x)
    tiled = encode_mean(NearestDecoder(), x, batch_size=1, tile=[8, 8, 8], overlap=0.5)
    assert tiled.shape == whole.shape == (2, 2, 8, 8, 8)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)
    ae = autoencoder(3)  # a real encoder: whole-volume means when one tile covers it all, and the right shape
    torch.testing.assert_close(encode_mean(ae, x, tile=[16, 16, 16]), encode_mean(ae, x))
    assert encode_mean(ae, x, tile=[8, 8, 8]).shape == (2, 2, 8, 8, 8)
    metrics, recon = reconstruction_metrics(ae, x, tile=[8, 8, 8])  # latent tiles of 4³ to decode
    assert recon.shape == x.shape and metrics["autoencoder/val_l1"] > 0
    with pytest.raises(ValueError, match="encode_tile"):
        encode_mean(ae, x, tile=[8, 8])


def test_encode_tiles_must_step_on_the_latent_grid():
    x = torch.rand(1, 1, 24, 24, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole = encode_mean(NearestDecoder(), x)  # compression 2
    assert check_tile([8] * 3, [24] * 3, 2, "autoencoder.encode_tile", ENCODE_OVERLAP) == [8] * 3  # steps by 6
    torch.testing.assert_close(encode_mean(NearestDecoder(), x, tile=[8] * 3), whole, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"encode_tile=\[10, 10, 10\].*step by \[7, 7, 7\].*multiples of 8"):
        check_tile([10] * 3, [24] * 3, 2, "autoencoder.encode_tile", ENCODE_OVERLAP)
    # tiles starting at 7: what the check prevents
    assert not torch.allclose(encode_mean(NearestDecoder(), x, tile=[10] * 3), whole, atol=1e-2)
    assert check_tile([10, 16, 16], [16] * 3, 2, "k") == [10, 16, 16]  # patches (no overlap) need only multiples


def test_crops_come_from_their_corners_and_patch_training_is_seeded():
    x = torch.arange(2 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    out = latent.crop(x, torch.tensor([[0, 2], [4, 1]]), [2, 4])
    assert torch.equal(out[0, 0], x[0, 0, 0:2, 2:6]) and torch.equal(out[1, 0], x[1, 0, 4:6, 1:5])
    images = blobs(2, n=4, size=16)
    runs = []
    for _ in range(2):
        ae = autoencoder(2).train()
        settings = AutoencoderSettings(
            max_steps=4, batch_size=2, log_every=2, patch_size=[8, 8], encode_tile=[8, 8], val_every=2
        )
        runs.append(
            fit_ae(
                ae,
                EMA(ae, 0.9),
                Optimizers(torch.optim.Adam(ae.parameters(), 1e-3)),
                images,
                settings,
                val_images=images[:2],
            )
        )
    assert runs[0].terms == runs[1].terms and [s for s, _ in runs[0].val] == [2]
    with pytest.raises(ValueError, match="patch_size"):
        fit_ae(
            ae,
            EMA(ae),
            Optimizers(torch.optim.Adam(ae.parameters())),
            images,
            AutoencoderSettings(max_steps=1, patch_size=[32, 8]),
        )


def test_autoencoder_on_patches_records_its_encode_tile(prepared_3d, tmp_path):
    section = {**SECTION, "patch_size": [8, 8, 8], "encode_tile": [8, 8, 8]}
    result = train_autoencoder(section, prepared_3d, tmp_path / "ae.pt", tmp_path / "latents")
    space = load_latent_space(result.path)
    assert space.encode_tile == [8, 8, 8] and space.latent_shape == [6, 6, 6] and space.decode_tile == [4, 4, 4]
    z = torch.randn(1, 2, 6, 6, 6)  # decoded in the latent tiles the decoder was trained on, unless told otherwise
    torch.testing.assert_close(space.decode(z), decode_latents(space.autoencoder, z / space.scale_factor, tile=[4] * 3))
    assert not torch.allclose(space.decode(z), space.decode(z, tile=[6, 6, 6]), atol=1e-3)
    images, _ = load_split(prepared_3d, "train")
    cached, _ = cached_latents(space, prepared_3d, tmp_path / "latents")
    torch.testing.assert_close(cached * space.scale_factor, space.encode(images))  # the cache was encoded in tiles
    assert not torch.allclose(cached, encode_mean(space.autoencoder, images), atol=1e-3)  # whole volumes differ
    deep = {
        "_target_": "monai.networks.nets.PatchDiscriminator",
        "spatial_dims": 3,
        "in_channels": 1,
        "channels": 8,
        "num_layers_d": 2,
        "norm": "INSTANCE",
    }  # 8³ shrinks to 1³: instance norm has nothing
    with pytest.raises(ValueError, match="num_layers_d=2.*raise autoencoder.patch_size"):
        train_autoencoder({**section, "discriminator": deep}, prepared_3d, tmp_path / "deep.pt", tmp_path / "latents")
    assert not (tmp_path / "deep.pt").exists()
    for key, bad in (("patch_size", [7, 7, 7]), ("encode_tile", [16, 16, 16]), ("patch_size", [8, 8])):
        with pytest.raises(ValueError, match=f"autoencoder.{key}"):
            train_autoencoder({**SECTION, key: bad}, prepared_3d, tmp_path / f"{key}.pt", tmp_path / "latents")


def test_latent_training_needs_unclipped_scheduler_and_a_finished_autoencoder(trained, tmp_path):
    result, _ = trained
    latent_section = {"autoencoder_ckpt": str(result.path)}
    with pytest.raises(ValueError, match="clip_sample=false"):
        latent_space_for_training(latent_section, None, torch.device("cpu"), clip_sample=True)
    assert latent_space_for_training({"autoencoder_ckpt": None}, None, torch.device("cpu"), clip_sample=True) is None
    space = latent_space_for_training(latent_section, None, torch.device("cpu"), clip_sample=False)
    assert space.latent_channels == 2 and space.id == result.id
    assert latent_section == {"autoencoder_ckpt": str(result.path)}  # read, not changed
    with pytest.raises(FileNotFoundError, match="train_autoencoder"):
        latent_space_for_training(
            {"autoencoder_ckpt": str(tmp_path / "missing.pt")}, None, torch.device("cpu"), clip_sample=False
        )
    with pytest.raises(ValueError, match="not the one"):
        load_latent_space(result.path, expect_id="0123456789ab")


def test_ldm_job_end_to_end_keeps_image_geometry(tmp_path, monkeypatch):
    for stage in (prepare, train):
        stage.run(compose_cfg(stage.__name__.split(".")[-1], tmp_path, LDM))
    ckpt = load_checkpoint(tmp_path / "train" / "checkpoints" / "last.pt")
    ae = load_checkpoint(tmp_path / "autoencoder" / "checkpoints" / "last.pt")
    assert ckpt.meta["latent"]["autoencoder_id"] == ae.id
    assert ckpt.meta["latent"]["scale_factor"] == ae.meta["scale_factor"]
    assert ckpt.meta["latent"]["latent_shape"] == [6, 6, 6] and ckpt.meta["image_shape"] == [12, 12, 12]
    assert ckpt.config["model"]["in_channels"] == ckpt.config["model"]["out_channels"] == 2

    monkeypatch.setattr(latent.space, "encode_mean", lambda *a, **k: pytest.fail("re-encoded cached latents"))
    assert train.run(compose_cfg("train", tmp_path, [*LDM, "training.max_steps=6"]))["train/step"] == 6
    sample.run(compose_cfg("sample", tmp_path, [*LDM, "sample.decode_tile=[4,4,4]"]))
    images, labels, _, info = load_samples(tmp_path / "samples")
    assert images.shape == (6, 1, 12, 12, 12) and info["image_shape"] == [12, 12, 12]
    assert info["latent"]["autoencoder_id"] == ae.id and ae.id in info["model"]
    export.run(compose_cfg("export", tmp_path, LDM))
    dataset = json.loads((tmp_path / "prepared" / "dataset.json").read_text())
    files = sorted((tmp_path / "export" / "images").glob("*.nii.gz"))
    assert len(files) == 6 and ae.id in (tmp_path / "export" / "DATA_CARD.md").read_text()
    img = nib.load(files[0])
    assert img.shape == (12, 12, 12)
    np.testing.assert_allclose(img.affine, np.asarray(dataset["affine"]), atol=1e-5)

    # resuming on another autoencoder's latents is refused before any weight is touched
    last = tmp_path / "train" / "checkpoints" / "last.pt"
    payload = torch.load(last, weights_only=True)
    meta = json.loads(payload["meta"])  # checkpoints store their meta as JSON text
    meta["latent"]["autoencoder_id"] = "0123456789ab"
    torch.save({**payload, "meta": json.dumps(meta)}, last)
    with pytest.raises(ValueError, match="autoencoder 0123456789ab, but this run trains on the latents of autoencoder"):
        train.run(compose_cfg("train", tmp_path, [*LDM, "training.max_steps=8"]))


def test_train_autoencoder_stage_needs_an_autoencoder(tmp_path):
    overrides = ["experiment=demo_3d", *TINY]
    prepare.run(compose_cfg("prepare", tmp_path, overrides))
    with pytest.raises(ValueError, match="autoencoder=kl_small"):
        train_autoencoder_stage.run(compose_cfg("train_autoencoder", tmp_path, overrides))
    out = train_autoencoder_stage.run(
        compose_cfg("train_autoencoder", tmp_path, [*overrides, "autoencoder=kl_tiny", "autoencoder.max_steps=2"])
    )
    assert out["autoencoder/step"] == 2 and out["autoencoder/scale_factor"] > 0


def test_ct128_experiment_composes_for_one_gpu(tmp_path):
    for stage in ("train_autoencoder", "train", "sample"):
        cfg = compose_cfg(stage, tmp_path, ["experiment=ldm_3d_ct128"])
        assert list(cfg.data.image_size) == [128, 128, 128] and cfg.autoencoder.network.spatial_dims == 3
    spec = cfg.autoencoder.network
    assert check_shape(cfg.data.image_size, spec) == [32, 32, 32] and spec.latent_channels == 4
    assert cfg.model.channels[-1] % cfg.model.num_head_channels == 0
    assert cfg.scheduler.clip_sample is False and len(cfg.sample.decode_tile) == 3
    assert cfg.latent.autoencoder_ckpt.endswith("autoencoder/checkpoints/last.pt")


def test_bf16_autocast_training_with_discriminator_stays_finite_in_3d():
    x = blobs(3, n=4)
    ae = autoencoder(3).train()
    disc = network_from_spec(
        {
            "_target_": "monai.networks.nets.PatchDiscriminator",
            "spatial_dims": 3,
            "in_channels": 1,
            "channels": 8,
            "num_layers_d": 1,
            "norm": "INSTANCE",
        }
    )
    opts = Optimizers(torch.optim.Adam(ae.parameters(), 1e-3), disc, torch.optim.Adam(disc.parameters(), 1e-3))
    settings = AutoencoderSettings(max_steps=4, batch_size=4, log_every=2, adv_start=2, amp_dtype=torch.bfloat16)
    result = fit_ae(ae, EMA(ae), opts, x, settings)
    assert result.step == 4 and "autoencoder/disc" in result.terms[-1][1]
    assert all(np.isfinite(v) for _, m in result.terms for v in m.values())
    assert all(p.dtype == torch.float32 for p in ae.parameters())  # autocast, weights stay fp32


@pytest.mark.slow
def test_ldm_training_on_two_cpu_ranks_matches_one_process_with_double_batch(tmp_path):
    """torchrun, 2 gloo ranks: the autoencoder (adversarial loss on from step 1, DDP discriminator), the
    latents the ranks encode together, and the UNet on them equal one process with the doubled batch."""
    disc = (
        "{_target_:monai.networks.nets.PatchDiscriminator,spatial_dims:3,in_channels:1,channels:8,num_layers_d:1,"
        "norm:INSTANCE}"
    )
    common = [
        *LDM,
        f"paths.output_dir={tmp_path}",
        "training.max_steps=3",
        "autoencoder.max_steps=3",
        "training.grad_clip=null",
        f"autoencoder.discriminator={disc}",
        "autoencoder.adv_start=1",
        "autoencoder.log_every=1",
    ]
    prepare.run(compose_cfg("prepare", tmp_path, common))

    def job(name):
        return [
            f"paths.train_dir={tmp_path}/{name}",
            f"latent.cache_dir={tmp_path}/{name}/latents",
            f"latent.autoencoder_ckpt={tmp_path}/{name}/ae.pt",
        ]

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "pipelines.train",
            *common,
            "training.batch_size=2",
            *job("ddp"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    train.run(compose_cfg("train", tmp_path, [*common, "training.batch_size=4", *job("one")]))

    ae_ddp, ae_one = (load_checkpoint(tmp_path / name / "ae.pt") for name in ("ddp", "one"))
    assert ae_ddp.step == ae_one.step == 3
    init = network_from_spec(ae_one.config["model"]).state_dict()
    for weights in ("model", "ema"):
        for name, w in getattr(ae_one, weights).items():
            torch.testing.assert_close(getattr(ae_ddp, weights)[name], w, atol=1e-4, rtol=1e-3)
    assert max(float((ae_one.model[k] - init[k]).abs().max()) for k in init) > 1e-3  # training moved them
    assert all(float(ae.optimizer["disc_optimizer"]["state"][0]["step"]) == 2 for ae in (ae_ddp, ae_one))
    for name, w in ae_one.optimizer["discriminator"].items():  # trained in steps 1 and 2
        torch.testing.assert_close(ae_ddp.optimizer["discriminator"][name], w, atol=1e-4, rtol=1e-3)
    assert ae_ddp.meta["scale_factor"] == pytest.approx(ae_one.meta["scale_factor"], rel=1e-4)
    cached = [torch.load(next((tmp_path / name / "latents").rglob("train.pt"))) for name in ("ddp", "one")]
    assert cached[0]["latents"].shape[0] == sum(
        load_info(tmp_path / "prepared").counts["train"].values()
    ) and torch.equal(cached[0]["labels"], cached[1]["labels"])
    torch.testing.assert_close(cached[0]["latents"], cached[1]["latents"], atol=1e-4, rtol=1e-3)

    unet_ddp, unet_one = (load_checkpoint(tmp_path / name / "checkpoints" / "last.pt") for name in ("ddp", "one"))
    assert unet_ddp.meta["latent"]["scale_factor"] == pytest.approx(unet_one.meta["latent"]["scale_factor"], rel=1e-4)
    for name, w in unet_one.model.items():
        torch.testing.assert_close(unet_ddp.model[name], w, atol=1e-4, rtol=1e-3)


def test_sigterm_stops_autoencoder_training_with_a_checkpoint_and_a_failing_tracker_does_not(tmp_path):
    import signal

    from medaug.training import Terminated

    x = blobs(2, n=8)

    class Tracker:  # SIGTERM arrives during step 1's logging, which fails: the server is gone too
        run_id = None

        def log_metrics(self, metrics, step=None):
            os.kill(os.getpid(), signal.SIGTERM)
            raise ConnectionError("tracking server went away")

    ae = autoencoder(2).train()
    ema, opts = EMA(ae, 0.9), Optimizers(torch.optim.Adam(ae.parameters(), 1e-3))
    payload = lambda: {"config": {"model": {**AE, "spatial_dims": 2}}, "meta": {"kind": "autoencoder"}}  # noqa: E731
    with pytest.raises(Terminated, match="after step 1"):
        fit_ae(
            ae,
            ema,
            opts,
            x,
            AutoencoderSettings(max_steps=50, batch_size=4, log_every=1, ckpt_every=0),
            ckpt_path=tmp_path / "ae.pt",
            checkpoint_payload=payload,
            tracker=Tracker(),
        )
    ckpt = load_checkpoint(tmp_path / "ae.pt")
    assert ckpt.step == 1 and ckpt.meta == {"kind": "autoencoder"}  # the tracking error did not stop it first
    for a, b in zip(ckpt.model.values(), ae.state_dict().values()):  # the weights of exactly step 1
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_autoencoder_killed_at_a_checkpoint_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    """fit with the AutoencoderStep (discriminator on from step 2, random crops): SIGTERM after the checkpoint of
    step 3, then a fresh process state restored from it, trains to exactly the weights, EMA, discriminator and
    optimizer states of one run straight to step 6."""
    import signal

    from medaug.model import restore_training_state
    from medaug.training import Terminated

    x = blobs(2, n=8, size=16)
    settings = AutoencoderSettings(max_steps=6, batch_size=4, adv_start=2, log_every=1, ckpt_every=3, patch_size=[8, 8])
    payload = lambda: {"config": {"model": {**AE, "spatial_dims": 2}}, "meta": {"kind": "autoencoder"}}  # noqa: E731

    def fresh():
        ae = autoencoder(2).train()
        torch.manual_seed(1)
        disc = network_from_spec(
            {
                "_target_": "monai.networks.nets.PatchDiscriminator",
                "spatial_dims": 2,
                "in_channels": 1,
                "channels": 8,
                "num_layers_d": 1,
                "norm": "INSTANCE",
            }
        )
        opts = Optimizers(torch.optim.Adam(ae.parameters(), 3e-3), disc, torch.optim.Adam(disc.parameters(), 1e-3))
        return ae, EMA(ae, 0.9), opts

    class KillsAfter3:  # SIGTERM during step 3's logging: step 3 finishes, is checkpointed, and the run stops
        run_id = None

        def log_metrics(self, metrics, step=None):
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    ae, ema, opts = fresh()
    straight = fit_ae(ae, ema, opts, x, settings, ckpt_path=tmp_path / "straight.pt", checkpoint_payload=payload)
    ae2, ema2, opts2 = fresh()
    with pytest.raises(Terminated, match="after step 3"):
        fit_ae(
            ae2,
            ema2,
            opts2,
            x,
            settings,
            ckpt_path=tmp_path / "ae.pt",
            checkpoint_payload=payload,
            tracker=KillsAfter3(),
        )
    ae2, ema2, opts2 = fresh()
    ckpt = load_checkpoint(tmp_path / "ae.pt")
    assert ckpt.step == 3
    restore_training_state(ckpt, ae2, ema2, opts2)
    resumed = fit_ae(
        ae2, ema2, opts2, x, settings, start_step=3, ckpt_path=tmp_path / "ae.pt", checkpoint_payload=payload
    )
    assert [s for s, _ in resumed.terms] == [4, 5, 6] and resumed.terms == straight.terms[3:]
    assert "autoencoder/disc" in resumed.terms[0][1]
    a, b = load_checkpoint(tmp_path / "straight.pt"), load_checkpoint(tmp_path / "ae.pt")
    assert a.step == b.step == 6

    def tensors(tree):
        if isinstance(tree, torch.Tensor):
            return [tree]
        if isinstance(tree, dict):
            return [t for v in tree.values() for t in tensors(v)]
        return [t for v in tree for t in tensors(v)] if isinstance(tree, (list, tuple)) else []

    for part in ("model", "ema", "optimizer"):  # the optimizer entry holds the discriminator and its optimizer too
        assert all(torch.equal(u, v) for u, v in zip(tensors(getattr(a, part)), tensors(getattr(b, part))))
    assert len(tensors(a.optimizer["discriminator"])) > 0
