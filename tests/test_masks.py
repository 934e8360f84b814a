"""Where the masks of mask-conditioned sampling come from (medaug.masks), end to end on tiny data."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medaug.data import load_split, load_split_masks
from medaug.io import write_nifti
from medaug.masks import check_mask_model, mask_seed, read_masks
from medaug.model import load_checkpoint
from medaug.sampling import load_sample_masks, load_samples
from pipelines import prepare, sample, train

from .conftest import TINY, compose_cfg

SEG = ["experiment=demo_2d_seg", *TINY, "data.demo.size=12", "data.image_size=[12,12]"]


@pytest.fixture(scope="module")
def seg_job(tmp_path_factory):
    """A prepared demo with masks, a mask+class image model and its mask model (training.mask_model=true)."""
    out = tmp_path_factory.mktemp("seg")
    prepare.run(compose_cfg("prepare", out, SEG))
    result = train.run(compose_cfg("train", out, SEG))
    assert result["mask_checkpoint"] == str(out / "train" / "mask" / "checkpoints" / "last.pt")
    return out


def _sample(out, folder, *overrides):
    return sample.run(compose_cfg("sample", out, [*SEG, f"paths.samples_dir={out / folder}", *overrides]))


def test_checkpoints_record_their_conditioning(seg_job):
    image = load_checkpoint(seg_job / "train" / "checkpoints" / "last.pt")
    mask = load_checkpoint(seg_job / "train" / "mask" / "checkpoints" / "last.pt")
    assert image.meta["condition"]["kind"] == "mask+class"
    assert image.meta["condition"]["mask_labels"] == {"background": 0, "lesion": 1}
    assert image.config["model"]["in_channels"] == 1 + 2 and image.config["model"]["num_class_embeds"] == 4
    assert mask.meta["condition"]["generates"] == "mask" and mask.config["model"]["out_channels"] == 2
    assert check_mask_model(mask.meta, image.meta, "mask.pt") == 2
    with pytest.raises(ValueError, match="generates images, not masks"):
        check_mask_model(image.meta, image.meta, "image.pt")


def test_generated_masks_then_images_are_seeded_pairs(seg_job):
    _sample(seg_job, "gen_a", "sample.masks=generate")
    _sample(seg_job, "gen_b", "sample.masks=generate")
    images, labels, rows, info = load_samples(seg_job / "gen_a")
    masks = load_sample_masks(seg_job / "gen_a")
    assert images.shape == (6, 1, 12, 12) and masks.shape == (6, 1, 12, 12) and masks.dtype == torch.long
    assert set(masks.unique().tolist()) <= {0, 1} and labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert {r["mask_source"] for r in rows} == {"generated"}
    assert all(int(r["mask_redraws"]) >= 0 for r in rows)  # the plausibility check's redraws, per sample
    assert info["mask_labels"] == {"background": 0, "lesion": 1}
    mask_ckpt = load_checkpoint(seg_job / "train" / "mask" / "checkpoints" / "last.pt")
    assert info["sample"]["mask_ckpt"] == mask_ckpt.id  # provenance by id, no path
    again, _, _, _ = load_samples(seg_job / "gen_b")
    assert torch.equal(images, again) and torch.equal(masks, load_sample_masks(seg_job / "gen_b"))
    assert mask_seed(1234) not in range(1234, 1234 + 6)  # the masks' noise is not any image's


def test_masks_of_a_prepared_split_and_of_a_user_folder_and_csv(seg_job, tmp_path):
    prepared = seg_job / "prepared"
    _sample(seg_job, "real", "sample.masks=prepared:val", "sample.per_mask=2")
    _, labels, rows, _ = load_samples(seg_job / "real")
    val_masks, val_labels = load_split_masks(prepared, "val"), load_split(prepared, "val")[1]
    assert torch.equal(load_sample_masks(seg_job / "real"), val_masks.repeat_interleave(2, 0))
    assert torch.equal(labels, val_labels.repeat_interleave(2)) and rows[0]["mask_source"] == "real"

    lesion = np.zeros((12, 12, 1), np.uint8)
    lesion[3:7, 4:8] = 1
    for name in ("healthy", "single_lesion"):
        (tmp_path / "masks" / name).mkdir(parents=True)
        write_nifti(tmp_path / "masks" / name / "a.nii.gz", lesion * (name != "healthy"), np.eye(4), dtype=np.uint8)
    _sample(seg_job, "user", f"sample.masks={tmp_path / 'masks'}")
    images, labels, rows, _ = load_samples(seg_job / "user")
    got = load_sample_masks(seg_job / "user")
    assert labels.tolist() == [0, 2] and rows[1]["mask_source"] == "user" and int(got[1].sum()) == 16
    with open(tmp_path / "masks.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["mask", "class_name"], ["masks/single_lesion/a.nii.gz", "single_lesion"]])
    source = read_masks(
        str(tmp_path / "masks.csv"),
        ["healthy", "multi_lesion", "single_lesion"],
        image_shape=(12, 12),
        mask_labels={"background": 0, "lesion": 1},
    )
    assert source.kind == "user" and source.labels.tolist() == [2] and int(source.masks.sum()) == 16


@pytest.mark.parametrize(
    "problem, message",
    [
        ("no_source", "this model is conditioned on masks \\(mask\\+class\\); set sample.masks=generate"),
        ("unknown_class", "class 'tumour' unknown; the model's classes are"),
        ("wrong_shape", "masks of shape \\[8, 8\\], but the model makes images of \\[12, 12\\]"),
        ("bad_value", "mask values 3..3, but the model knows labels"),
        ("bad_split", "split 'valid' unknown; use prepared:<train\\|val\\|test>"),
        ("no_mask_model", "no mask model; train one"),
    ],
)
def test_bad_mask_sources_are_refused_naming_the_fix(seg_job, tmp_path, problem, message):
    folder = tmp_path / "masks"
    shape, value, name = (
        (8, 8, 1) if problem == "wrong_shape" else (12, 12, 1),
        3 if problem == "bad_value" else 1,
        ("tumour" if problem == "unknown_class" else "healthy"),
    )
    (folder / name).mkdir(parents=True)
    write_nifti(folder / name / "m.nii.gz", np.full(shape, value, np.uint8), np.eye(4), dtype=np.uint8)
    source = {
        "no_source": "sample.masks=null",
        "bad_split": "sample.masks=prepared:valid",
        "no_mask_model": f"sample.mask_ckpt={tmp_path / 'none.pt'}",
    }.get(problem, f"sample.masks={folder}")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _sample(seg_job, "bad", source)
    assert not (seg_job / "bad").exists()


def test_a_class_only_model_refuses_masks_and_writes_no_mask(tmp_path):
    overrides = ["experiment=demo_2d", *TINY, "data.demo.size=12", "data.image_size=[12,12]"]
    prepare.run(compose_cfg("prepare", tmp_path, overrides))
    train.run(compose_cfg("train", tmp_path, overrides))
    assert "condition" not in load_checkpoint(tmp_path / "train" / "checkpoints" / "last.pt").meta
    with pytest.raises(ValueError, match="sample.masks=prepared:val is for mask-conditioned models"):
        sample.run(compose_cfg("sample", tmp_path, [*overrides, "sample.masks=prepared:val"]))
    sample.run(compose_cfg("sample", tmp_path, overrides))
    assert load_sample_masks(tmp_path / "samples") is None
    rows = load_samples(tmp_path / "samples")[2]
    assert "mask_source" not in rows[0]
    assert "mask_labels" not in json.loads((tmp_path / "samples" / "info.json").read_text())


def test_resuming_with_another_conditioning_is_refused(seg_job, tmp_path):
    cfg = compose_cfg("train", seg_job, [*SEG, "model.condition=class", "training.max_steps=6"])
    with pytest.raises(
        ValueError, match="trained conditioned on mask\\+class generating image, but this run asks for class"
    ):
        train.run(cfg)


def test_augment_with_a_mask_conditioned_model_writes_real_masks_beside_synthetic_images(seg_job, tmp_path):
    from medaug.augment import MixedDataset, augment, read_mixed_manifest

    prepared, ckpt = seg_job / "prepared", seg_job / "train" / "checkpoints" / "last.pt"
    kw = dict(policy="per_class", num_per_class=2, steps=2, batch_size=2, progress=False)
    augment(prepared, ckpt, tmp_path / "a", **kw)
    rows = read_mixed_manifest(tmp_path / "a")
    real = [r for r in rows if not r["synthetic"]]
    synthetic = [r for r in rows if r["synthetic"]]
    assert len(synthetic) == 6 and all(r["mask"] for r in rows)
    real_masks = {r["class_name"]: [] for r in real}
    for r in real:
        real_masks[r["class_name"]].append(np.asarray(nib.load(r["mask"]).dataobj))
    for r in synthetic:  # each synthetic image's mask is a real mask of its class
        mask = np.asarray(nib.load(r["mask"]).dataobj)
        assert mask.dtype == np.uint8 and any(np.array_equal(mask, m) for m in real_masks[r["class_name"]])
    item = MixedDataset(tmp_path / "a")[len(real)]
    assert item["image"].shape == (1, 12, 12) and item["mask"].shape == (1, 12, 12) and item["synthetic"]
    augment(prepared, ckpt, tmp_path / "b", **kw)  # seeded: the same masks and images
    again = [r for r in read_mixed_manifest(tmp_path / "b") if r["synthetic"]]
    for r, s in zip(synthetic, again):
        assert np.array_equal(nib.load(r["mask"]).dataobj, nib.load(s["mask"]).dataobj)
        assert np.array_equal(nib.load(r["path"]).dataobj, nib.load(s["path"]).dataobj)


@pytest.mark.slow
def test_latent_diffusion_takes_the_mask_on_the_latent_grid(tmp_path):
    overrides = ["experiment=ldm_3d_demo", *TINY, "autoencoder.max_steps=4", "data.demo.size=12"]
    overrides += ["data.image_size=[12,12,12]", "model.condition=mask+class", "sample.masks=prepared:val"]
    prepare.run(compose_cfg("prepare", tmp_path, overrides))
    train.run(compose_cfg("train", tmp_path, overrides))
    ckpt = load_checkpoint(tmp_path / "train" / "checkpoints" / "last.pt")
    latent_channels = ckpt.meta["latent"]["latent_channels"]
    assert ckpt.config["model"]["in_channels"] == latent_channels + 2 and ckpt.meta["condition"]["kind"] == "mask+class"
    sample.run(compose_cfg("sample", tmp_path, overrides))
    images, labels, rows, _ = load_samples(tmp_path / "samples")
    masks = load_sample_masks(tmp_path / "samples")
    assert images.shape == (len(labels), 1, 12, 12, 12) and torch.equal(
        masks, load_split_masks(tmp_path / "prepared", "val")
    )
    assert rows[0]["mask_source"] == "real"


def test_regenerating_a_dropped_pair_keeps_its_mask(seg_job):
    from medaug.regeneration import regenerate_copies

    _sample(seg_job, "regen", "sample.masks=prepared:val")
    images, labels, rows, info = load_samples(seg_job / "regen")
    masks = load_sample_masks(seg_job / "regen")
    keep = np.ones(len(labels), dtype=bool)
    keep[1] = False  # the copy filter dropped sample 1
    kw = dict(
        sample_info=info, ckpt_path=seg_job / "train" / "checkpoints" / "last.pt", prepared_dir=seg_job / "prepared"
    )
    new = regenerate_copies(images, labels, rows, keep, np.zeros(len(labels)), 1.0, masks=masks, **kw)
    assert len(new.images) == len(labels) and new.short == 0
    assert torch.equal(new.masks[:-1], masks[torch.from_numpy(keep)]) and torch.equal(new.masks[-1], masks[1])
    replacement = new.rows[-1]
    assert replacement["replaces_copy"] and replacement["index"] == len(labels)
    assert replacement["label"] == int(labels[1]) and replacement["mask_source"] == "real"
    with pytest.raises(ValueError, match="conditioned on masks: regenerating its samples needs their masks"):
        regenerate_copies(images, labels, rows, keep, np.zeros(len(labels)), 1.0, **kw)


def test_the_mask_model_trains_on_the_jobs_data_into_its_own_folder():
    """Its run is named <name>-mask, but its prepared data, other folders and MLflow experiment stay the job's
    (paths derive from the name: renaming alone would look for outputs/<name>-mask/prepared)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from medaug.masks import mask_model_overrides

    from .conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=demo_2d_seg"])  # paths from the name, as make demo
    paths = OmegaConf.to_container(cfg.paths, resolve=True)
    mask = OmegaConf.merge(cfg, mask_model_overrides(paths, cfg.name, cfg.tracking.experiment))
    assert mask.name == "demo_2d_seg-mask" and mask.model.generates == "mask" and mask.model.condition == "class"
    assert mask.paths.prepared_dir == paths["prepared_dir"] == "outputs/demo_2d_seg/prepared"
    assert mask.paths.train_dir == "outputs/demo_2d_seg/train/mask" and mask.ckpt_path is None
    assert mask.tracking.experiment == cfg.tracking.experiment and mask.latent.autoencoder_ckpt is None


def test_regenerating_a_generated_mask_copy_draws_a_new_mask_and_image(seg_job):
    from medaug.masks import mask_generator
    from medaug.regeneration import regenerate_copies

    _sample(seg_job, "regen_gen", "sample.masks=generate")
    images, labels, rows, info = load_samples(seg_job / "regen_gen")
    masks = load_sample_masks(seg_job / "regen_gen")
    masks[2] = load_split_masks(seg_job / "prepared", "train")[3]  # planted: sample 2's mask copies a training mask
    keep = np.array([True, False, False, True, True, True])  # sample 1: an image copy; sample 2: a mask copy
    mask_copy = np.array([False, False, True, False, False, False])
    mask_ckpt = seg_job / "train" / "mask" / "checkpoints" / "last.pt"
    kw = dict(
        sample_info=info, ckpt_path=seg_job / "train" / "checkpoints" / "last.pt", prepared_dir=seg_job / "prepared"
    )
    new = regenerate_copies(
        images,
        labels,
        rows,
        keep,
        np.zeros(6),
        1.0,
        masks=masks,
        mask_copy=mask_copy,
        mask_threshold=1.0,
        mask_ckpt_path=mask_ckpt,
        **kw,
    )
    assert new.short == 0 and [int(r["index"]) for r in new.rows] == [0, 3, 4, 5, 6, 7]
    assert torch.equal(new.masks[4], masks[1])  # the image copy: a new image on its own mask, as before
    s = info["sample"]  # the mask copy: a new mask, the one the mask model draws for sample 7 (its new index)
    make = mask_generator(
        mask_ckpt,
        load_checkpoint(kw["ckpt_path"]).meta,
        "cpu",
        seed=s["seed"],
        sampler=s["sampler"],
        steps=s["steps"],
        guidance_scale=s["guidance_scale"],
        batch_size=s["batch_size"],
        eta=s["eta"],
    )
    assert torch.equal(new.masks[5], make(labels[2:3], s["seed"] + 7)[0]) and not torch.equal(new.masks[5], masks[2])
    assert new.rows[5]["replaces_copy"] and new.rows[5]["label"] == int(labels[2])
    # a new mask that copies a training mask again is refused: with mask threshold -1 nothing passes
    strict = regenerate_copies(
        images,
        labels,
        rows,
        keep,
        np.zeros(6),
        1.0,
        masks=masks,
        mask_copy=mask_copy,
        mask_threshold=-1.0,
        mask_ckpt_path=mask_ckpt,
        max_rounds=2,
        **kw,
    )
    assert strict.short == 1 and len(strict.images) == 5
    with pytest.raises(ValueError, match="regenerating them needs the mask model"):
        regenerate_copies(
            images, labels, rows, keep, np.zeros(6), 1.0, masks=masks, mask_copy=mask_copy, mask_threshold=1.0, **kw
        )


@pytest.mark.slow
def test_evaluate_attacks_the_mask_conditioned_model_and_its_mask_model(seg_job):
    from pipelines import evaluate

    fast = [
        "evaluate.utility.seeds=[]",
        "evaluate.segmentation.steps=5",
        "evaluate.segmentation.seeds=[]",
        "evaluate.mia.bootstrap=50",
        f"paths.eval_dir={seg_job / 'eval_gen'}",
    ]
    _sample(seg_job, "mia_gen", "sample.masks=generate")
    result = evaluate.run(compose_cfg("evaluate", seg_job, [*SEG, f"paths.samples_dir={seg_job / 'mia_gen'}", *fast]))
    privacy = json.loads((seg_job / "eval_gen" / "privacy.json").read_text())
    assert privacy["mia"]["run"] and privacy["mia"]["condition"] == "mask+class"  # was skipped before
    assert 0 <= result["privacy/mia_auc"] <= 1 and result["privacy/mia_members"] > 0
    assert privacy["mask_mia"]["run"] and privacy["mask_mia"]["generates"] == "mask"
    assert "mask" in privacy  # the audit of the generated masks ran, and the mask model's attack joined it
    assert 0 <= result["privacy/mask_mia_auc"] <= 1
    assert any(c.startswith("masks: membership-inference AUC") for c in privacy["checks"])
    report = (seg_job / "eval_gen" / "report.md").read_text()
    assert "loss attack with each image's real mask as the condition" in report
    assert "membership inference, mask model: loss attack of the mask model, on the real masks" in report


def test_mask_range_refuses_masks_unlike_the_training_masks_of_their_class():
    from medaug.masks import MaskRange, component_sizes

    def boxes(*corners, size=3, shape=(12, 12)):
        m = torch.zeros(1, *shape, dtype=torch.long)
        for r, c in corners:
            m[0, r : r + size, c : c + size] = 1
        return m

    train = torch.stack([torch.zeros(1, 12, 12, dtype=torch.long), boxes((1, 1)), boxes((1, 1), (6, 6))])
    rng = MaskRange.of(train, torch.tensor([0, 1, 1]))  # class 0: empty; class 1: one or two 3x3 lesions
    assert rng.count == {0: {1: (0, 0)}, 1: {1: (1, 2)}} and rng.size == {1: {1: (9, 9)}}
    speckle = torch.zeros(1, 12, 12, dtype=torch.long)
    speckle[0, ::3, ::3] = 1  # 16 one-voxel components
    candidates = torch.stack([boxes((5, 5)), boxes((2, 2), (7, 7)), boxes((0, 0), size=12), speckle, boxes((4, 4))])
    assert rng.plausible(candidates, torch.tensor([1, 1, 1, 1, 0])).tolist() == [True, True, False, False, False]
    assert rng.plausible(candidates[:1], torch.tensor([2])).tolist() == [True]  # a class never seen: no judgement
    assert component_sizes(speckle[0].numpy() == 1) == [1] * 16 and component_sizes(np.zeros((3, 3, 3), bool)) == []


def test_implausible_generated_masks_are_redrawn_with_their_own_seeds(seg_job):
    from medaug.masks import MaskRange, mask_generator

    image = load_checkpoint(seg_job / "train" / "checkpoints" / "last.pt")
    kw = dict(sampler="ddim", steps=3, guidance_scale=2.0, batch_size=4)
    path = seg_job / "train" / "mask" / "checkpoints" / "last.pt"
    labels = torch.tensor([0, 1, 2, 2])
    plain = mask_generator(path, image.meta, "cpu", seed=5, **kw)(labels, 5)
    checked = mask_generator(path, image.meta, "cpu", seed=5, prepared_dir=seg_job / "prepared", max_redraws=3, **kw)
    masks = checked(labels, 5)
    reference = MaskRange.of(
        load_split_masks(seg_job / "prepared", "train"), load_split(seg_job / "prepared", "train")[1]
    )
    first = reference.plausible(plain, labels)
    for j in range(4):  # plausible masks are kept as drawn; the others were drawn again (and counted)
        if first[j]:
            assert torch.equal(masks[j], plain[j]) and j not in checked.redraws
        else:
            assert 1 <= checked.redraws[j] <= 3
    again = mask_generator(path, image.meta, "cpu", seed=5, prepared_dir=seg_job / "prepared", max_redraws=3, **kw)
    assert torch.equal(again(labels, 5), masks) and again.redraws == checked.redraws  # seeded
    assert not first.all()  # the 4-step tiny mask model draws implausible masks: the check has work to do
