import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDPMScheduler
from PIL import Image

from medaug.model import EMA, load_checkpoint, network_from_spec, save_checkpoint
from medaug.sampling import (
    Chunk,
    class_counts,
    generate_chunks,
    generate_sharded,
    inference_scheduler,
    labels_for_counts,
    load_samples,
    sample_images,
    sampling_network,
    save_samples,
    shard_chunks,
)

from .test_model import SPEC

SCHED = {
    "_target_": "monai.networks.schedulers.DDPMScheduler",
    "num_train_timesteps": 100,
    "schedule": "linear_beta",
    "variance_type": "fixed_small",
}


def net(spatial_dims=2):
    torch.manual_seed(0)
    return network_from_spec({**SPEC, "spatial_dims": spatial_dims}).eval()


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "pndm", "dpmpp_2m", "dpmpp_2m_sde"])
def test_same_seed_same_samples(spatial_dims, sampler):
    labels = labels_for_counts({0: 2, 2: 1})
    kw = dict(guidance_scale=2.0, null_class=3, batch_size=2, progress=False)
    shape = [8] * spatial_dims
    steps = SCHED["num_train_timesteps"] if sampler == "ddpm" else 4
    a = sample_images(net(spatial_dims), inference_scheduler(SCHED, sampler, steps), labels, shape, seed=5, **kw)
    b = sample_images(net(spatial_dims), inference_scheduler(SCHED, sampler, steps), labels, shape, seed=5, **kw)
    c = sample_images(net(spatial_dims), inference_scheduler(SCHED, sampler, steps), labels, shape, seed=6, **kw)
    assert a.shape == (3, 1, *shape) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_samplers_that_would_sample_wrongly_are_refused():
    with pytest.raises(ValueError, match="ddpm takes every one of the 100 training timesteps, not steps=20"):
        inference_scheduler(SCHED, "ddpm", 20)
    with pytest.raises(ValueError, match="pndm .* v_prediction"):
        inference_scheduler({**SCHED, "prediction_type": "v_prediction"}, "pndm", 20)
    v_model = {**SCHED, "prediction_type": "v_prediction"}
    assert inference_scheduler(v_model, "ddim", 20).prediction_type == "v_prediction"


@pytest.mark.parametrize("steps", [1, 3, 10, 30, 50, 100])
def test_ddim_steps_land_on_its_next_timestep(steps):
    sch = inference_scheduler(SCHED, "ddim", steps)
    t = sch.timesteps.tolist()
    assert len(t) == steps and t[0] == 99 and t == sorted(t, reverse=True)
    lands = [a - 100 // steps for a in t]  # MONAI's step goes to t - T // steps
    assert all(abs(a - b) <= (100 % steps > 0) for a, b in zip(lands, t[1:]))  # exact when steps divides T
    assert lands[-1] < 0  # the last step ends at the clean image


def test_step_noise_is_not_a_starting_noise():
    drawn = []

    class Recording(DDPMScheduler):
        def step(self, model_output, timestep, sample, generator=None):
            drawn.append(torch.randn(sample.shape, generator=generator))
            return super().step(model_output, timestep, sample, generator)

    sch = Recording(num_train_timesteps=10)
    sch.set_timesteps(10)
    sample_images(net(), sch, torch.tensor([0, 1]), [8, 8], guidance_scale=1.0, null_class=3, seed=5, progress=False)
    starts = [torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(5 + i)) for i in range(2)]
    assert len(drawn) == 10 and not any(
        torch.allclose(d[i], starts[j]) for d in drawn for i in range(2) for j in range(2)
    )


def test_ddim_sample_does_not_depend_on_batching():
    labels = labels_for_counts({0: 3, 1: 2})
    kw = dict(guidance_scale=1.5, null_class=3, seed=0, progress=False)
    whole = sample_images(net(), inference_scheduler(SCHED, "ddim", 3), labels, [8, 8], batch_size=5, **kw)
    split = sample_images(net(), inference_scheduler(SCHED, "ddim", 3), labels, [8, 8], batch_size=2, **kw)
    torch.testing.assert_close(whole, split, atol=1e-5, rtol=0)


def test_guidance_scale_one_skips_unconditional_pass():
    calls = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, timesteps, class_labels):
            calls.append(class_labels.tolist())
            return torch.zeros_like(x)

    labels = torch.tensor([0, 1])
    sample_images(
        Spy(),
        inference_scheduler(SCHED, "ddim", 2),
        labels,
        [4, 4],
        guidance_scale=1.0,
        null_class=3,
        seed=0,
        progress=False,
    )
    sample_images(
        Spy(),
        inference_scheduler(SCHED, "ddim", 2),
        labels,
        [4, 4],
        guidance_scale=3.0,
        null_class=3,
        seed=0,
        progress=False,
    )
    assert calls[0] == [0, 1] and calls[2] == [0, 1, 3, 3]


def test_bad_sampler_or_steps():
    with pytest.raises(ValueError, match="sampler"):
        inference_scheduler(SCHED, "euler", 10)
    with pytest.raises(ValueError, match="steps=500"):
        inference_scheduler(SCHED, "ddim", 500)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_samples_folder_and_grid(tmp_path, spatial_dims):
    images = torch.rand(4, 1, *([8] * spatial_dims)) * 2 - 1
    rows = [{"index": i, "label": i % 2, "class_name": "ab"[i % 2]} for i in range(4)]
    out = save_samples(tmp_path / "s", images, rows, {"checkpoint_id": "abc"}, ["a", "b"])
    x, y, r, info = load_samples(out)
    torch.testing.assert_close(x, images)
    assert y.tolist() == [0, 1, 0, 1] and info["checkpoint_id"] == "abc" and len(r) == 4
    grid = np.asarray(Image.open(out / "grid.png"))
    planes = 1 if spatial_dims == 2 else 3
    scale = 12  # 8-px images are enlarged to at least 96 px
    assert grid.shape == (2 * 10 * scale, 8 * (8 * planes + 2) * scale)  # 2 classes x 8 padded tiles


CLASSES = ["healthy", "single_lesion", "multi_lesion"]


def test_class_counts_from_an_int_or_a_map_for_every_class_in_label_order():
    assert class_counts(2, CLASSES) == {"healthy": 2, "single_lesion": 2, "multi_lesion": 2}
    counts = class_counts({"multi_lesion": 3, "healthy": 1}, CLASSES)
    assert list(counts.items()) == [("healthy", 1), ("single_lesion", 0), ("multi_lesion", 3)]
    assert labels_for_counts(counts, CLASSES).tolist() == [0, 2, 2, 2]
    assert labels_for_counts({0: 1, 2: 3}).tolist() == [0, 2, 2, 2]
    assert class_counts(0, CLASSES, allow_empty=True) == dict.fromkeys(CLASSES, 0)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"lesion": 2}, r"sample.num_per_class names unknown classes \['lesion'\]"),
        (0, r"sample.num_per_class=0 asks for no samples"),
        ({"healthy": 0}, r"asks for no samples"),
        ({"healthy": -1, "multi_lesion": 4}, "asks for a negative count"),
    ],
)
def test_class_counts_refuses_unknown_classes_negative_counts_and_no_samples(bad, match):
    with pytest.raises(ValueError, match=match):
        class_counts(bad, CLASSES)
    with pytest.raises(ValueError, match="augment.num_per_class"):
        class_counts({"lesion": 2}, CLASSES, key="augment.num_per_class", allow_empty=True)


def stamped(labels, seed):
    """A fake generator: image j of a call is filled with ``1000 * (seed + j) + label``: ``(n, 1, 2, 2)``."""
    value = 1000.0 * (seed + torch.arange(len(labels))) + labels
    return value.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()


def test_shard_chunks_deal_chunks_round_robin():
    assert shard_chunks(7, 2) == [Chunk(0, 0, 2), Chunk(1, 2, 4), Chunk(2, 4, 6), Chunk(3, 6, 7)]
    assert shard_chunks(7, 2, rank=0, world=2) == [Chunk(0, 0, 2), Chunk(2, 4, 6)]
    assert shard_chunks(7, 2, rank=1, world=2) == [Chunk(1, 2, 4), Chunk(3, 6, 7)]
    assert shard_chunks(1, 2, rank=2, world=3) == [] and shard_chunks(0, 2) == []
    with pytest.raises(ValueError, match="rank 2"):
        shard_chunks(4, 2, rank=2, world=2)


def test_two_ranks_make_together_what_one_process_makes(monkeypatch):
    labels = labels_for_counts({0: 3, 1: 2, 2: 2})
    seeds = []
    one = generate_sharded(lambda y, seed: seeds.append(seed) or stamped(y, seed), labels, chunk_size=2, seed=10)
    assert seeds == [10, 12, 14, 16] and one.shape == (7, 1, 2, 2)
    assert one[:, 0, 0, 0].tolist() == [1000.0 * (10 + i) + int(y) for i, y in enumerate(labels)]
    assert torch.equal(generate_sharded(stamped, labels, chunk_size=3, seed=10), one)  # any chunk size

    parts = [{c.index: x for c, x in generate_chunks(stamped, labels, shard_chunks(7, 2, r, 2), 10)} for r in (0, 1)]
    assert sorted(parts[0]) == [0, 2] and sorted(parts[1]) == [1, 3]
    for rank in (0, 1):  # all_gather_object of a 2-process group, simulated: every rank receives both parts

        def all_gather_object(out, mine, rank=rank):
            assert all(torch.equal(mine[k], parts[rank][k]) for k in parts[rank]) and mine.keys() == parts[rank].keys()
            out[:] = parts

        monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
        assert torch.equal(generate_sharded(stamped, labels, chunk_size=2, seed=10, rank=rank, world=2), one)
    with pytest.raises(ValueError, match="0 labels"):
        generate_sharded(stamped, labels[:0], chunk_size=2, seed=10)


def test_sampling_network_picks_ema_or_training_weights(tmp_path):
    model = net()
    ema = EMA(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the training weights move on; the EMA still holds the first ones
    meta = dict(class_names=["a", "b", "c"], spatial_dims=2, image_shape=[8, 8])
    path = save_checkpoint(
        tmp_path / "c.pt",
        model=model,
        ema=ema,
        optimizer=None,
        step=1,
        config={"model": SPEC, "scheduler": SCHED},
        meta=meta,
    )
    ckpt = load_checkpoint(path)
    for use_ema, state in [(True, ema.state_dict()["model"]), (False, model.state_dict())]:
        built = sampling_network(ckpt, "cpu", use_ema=use_ema)
        assert not built.training and next(built.parameters()).device.type == "cpu"
        assert all(torch.equal(v, state[k]) for k, v in built.state_dict().items())
