import pytest
import torch

from medaug.model import EMA, ema_network, load_checkpoint, network_from_spec, restore_training_state, save_checkpoint

SPEC = {
    "_target_": "monai.networks.nets.DiffusionModelUNet",
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 1,
    "channels": [8, 8],
    "attention_levels": [False, False],
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 8,
    "num_class_embeds": 4,
}


def test_network_from_spec_and_bad_target():
    net = network_from_spec(SPEC)
    out = net(torch.zeros(2, 1, 8, 8), timesteps=torch.tensor([1, 2]), class_labels=torch.tensor([0, 3]))
    assert out.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="cannot import"):
        network_from_spec({"_target_": "monai.networks.nets.NoSuchNet"})


def test_ema_tracks_weights_with_warmup():
    net = torch.nn.Linear(2, 1, bias=False)
    ema = EMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)
    start = ema.model.weight.clone()
    ema.update(net)  # warm-up decay min(0.9, 2/11)
    d = 2 / 11
    torch.testing.assert_close(ema.model.weight, d * start + (1 - d) * torch.ones_like(start))
    for _ in range(200):
        ema.update(net)
    torch.testing.assert_close(ema.model.weight, torch.ones_like(start), atol=1e-6, rtol=0)


def test_checkpoint_roundtrip(tmp_path):
    net = network_from_spec(SPEC)
    ema = EMA(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.zeros(1, 1, 8, 8), timesteps=torch.tensor([1]), class_labels=torch.tensor([0])).mean().backward()
    opt.step()
    ema.update(net)
    path = save_checkpoint(
        tmp_path / "c.pt",
        model=net,
        ema=ema,
        optimizer=opt,
        step=7,
        config={"model": SPEC},
        meta={"class_names": ["a", "b", "c"]},
    )
    ckpt = load_checkpoint(path)
    assert ckpt.step == 7 and ckpt.meta["class_names"] == ["a", "b", "c"] and len(ckpt.id) == 12
    assert set(ckpt.rng) >= {"torch", "numpy", "python"}
    assert ckpt.optimizer["state"]  # Adam moments saved
    rebuilt = ema_network(ckpt)
    for a, b in zip(rebuilt.state_dict().values(), ema.model.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert not list(tmp_path.glob(".*tmp*"))


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train first"):
        load_checkpoint(tmp_path / "none.pt")
    with pytest.raises(FileNotFoundError, match="is a folder; pass the checkpoint file in it"):
        load_checkpoint(tmp_path)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a medaug checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


# --------------------------------------------------------------------------- a checkpoint is data, not code


def _saved(tmp_path, spec=SPEC, name="c.pt"):
    net = network_from_spec(SPEC)
    return save_checkpoint(
        tmp_path / name,
        model=net,
        ema=EMA(net),
        optimizer=None,
        step=3,
        config={"model": spec},
        meta={"class_names": ["a", "b", "c"]},
    )


class Payload:
    """Unpickling this runs ``open(marker, "w")``: what a crafted checkpoint can do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_marker(path, **kwargs):
    """A function a crafted checkpoint names as its model's ``_target_``."""
    with open(path, "w") as fh:
        fh.write("ran")


class TinyNet(torch.nn.Module):  # a legitimate network outside the allow-list
    def __init__(self, width: int = 3):
        super().__init__()
        self.lin = torch.nn.Linear(width, 1)


def test_checkpoint_is_plain_data_readable_with_weights_only(tmp_path):
    path = _saved(tmp_path)
    payload = torch.load(path, weights_only=True)  # raises on any pickled object
    assert isinstance(payload["config"], str) and payload["step"] == 3
    assert load_checkpoint(path).config == {"model": SPEC}


def test_pickle_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "ema": {}, "step": 1, "config": {"x": Payload(marker)}, "meta": {}}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt: refused: .*(builtins|io)\.open") as err:
        load_checkpoint(tmp_path / "evil.pt")
    assert "trust_checkpoint=true" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_old_pickled_checkpoint_refused_unless_trusted(tmp_path):
    import random

    import numpy as np

    net = network_from_spec(SPEC)
    old = {
        "model": net.state_dict(),
        "ema": EMA(net).state_dict(),
        "optimizer": None,
        "step": 5,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "config": {"model": SPEC},
        "meta": {"class_names": ["a"]},
    }
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="retrain, or if you trust the file, pass trust_checkpoint=true"):
        load_checkpoint(tmp_path / "old.pt")
    ckpt = load_checkpoint(tmp_path / "old.pt", trust=True)
    assert ckpt.step == 5 and ckpt.config == {"model": SPEC}
    restore_training_state(ckpt, net, EMA(net))  # the old numpy/python RNG tuples still restore
    assert np.random.get_state()[2] == old["rng"]["numpy"][2]


@pytest.mark.parametrize(
    "target", ["tests.test_model.write_marker", "os.system", "monai.networks.nets.get_pretrained_resnet_medicalnet"]
)
def test_checkpoint_naming_an_unlisted_target_is_refused_without_calling_it(tmp_path, target):
    marker = tmp_path / "ran"
    ckpt = load_checkpoint(_saved(tmp_path, {"_target_": target, "path": str(marker)}))
    with pytest.raises(ValueError, match=f"refused to build model._target_='{target}'.*trust_checkpoint=true"):
        ema_network(ckpt)
    assert not marker.exists()


def test_trusted_checkpoint_builds_an_unlisted_class(tmp_path):
    from medaug.model import checkpoint_network

    net = TinyNet()
    path = save_checkpoint(
        tmp_path / "c.pt",
        model=net,
        ema=EMA(net),
        optimizer=None,
        step=1,
        config={"model": {"_target_": "tests.test_model.TinyNet", "width": 3}},
        meta={},
    )
    with pytest.raises(ValueError, match="TinyNet"):
        checkpoint_network(load_checkpoint(path))
    rebuilt = checkpoint_network(load_checkpoint(path, trust=True), "model")
    torch.testing.assert_close(rebuilt.lin.weight, net.lin.weight)


def test_rng_state_roundtrips_through_a_checkpoint(tmp_path):
    import random

    import numpy as np

    path = _saved(tmp_path)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt = load_checkpoint(path)
    torch.rand(5), np.random.rand(5), random.random()
    net = network_from_spec(SPEC)
    restore_training_state(ckpt, net, EMA(net))
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
