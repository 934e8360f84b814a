import pytest
import torch

from medaug.model import EMA, ema_network, load_checkpoint, network_from_spec, save_checkpoint

SPEC = {"_target_": "monai.networks.nets.DiffusionModelUNet", "spatial_dims": 2, "in_channels": 1,
        "out_channels": 1, "channels": [8, 8], "attention_levels": [False, False], "num_res_blocks": 1,
        "num_head_channels": 8, "norm_num_groups": 8, "num_class_embeds": 4}


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
    path = save_checkpoint(tmp_path / "c.pt", model=net, ema=ema, optimizer=opt, step=7,
                           config={"model": SPEC}, meta={"class_names": ["a", "b", "c"]})
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
