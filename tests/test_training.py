import os

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from medaug.model import EMA, load_checkpoint, network_from_spec
from medaug.training import (
    DiffusionStep,
    TrainSettings,
    diffusion_loss,
    draw_batch,
    draw_step_noise,
    fit,
    prepare_for_speed,
    step_generator,
)

from .test_model import SPEC


def tiny(spatial_dims=2):
    torch.manual_seed(0)
    net = network_from_spec({**SPEC, "spatial_dims": spatial_dims})
    return net, EMA(net), torch.optim.AdamW(net.parameters(), lr=1e-3), DDPMScheduler(num_train_timesteps=100)


def diffusion(net, sch, x, y):
    return DiffusionStep(net, sch, x, y, null_class=3)


def data(spatial_dims=2, n=8):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, *([8] * spatial_dims), generator=g) * 2 - 1, torch.arange(n) % 3


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_loss_is_per_sample_and_fp32(spatial_dims):
    net, _, _, sch = tiny(spatial_dims)
    x, y = data(spatial_dims, 4)
    loss = diffusion_loss(net, sch, x, y, null_class=3, p_uncond=0.5, generator=step_generator(0, 0))
    assert loss.shape == (4,) and loss.dtype == torch.float32 and torch.all(loss > 0)
    assert sch.alphas_cumprod.dtype == torch.float32


def test_cfg_drops_labels_to_null_class():
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, timesteps, class_labels):
            seen.append(class_labels.clone())
            return x * self.w

    sch = DDPMScheduler(num_train_timesteps=10)
    x, y = torch.zeros(64, 1, 4, 4), torch.zeros(64, dtype=torch.long)
    diffusion_loss(Spy(), sch, x, y, null_class=3, p_uncond=0.0, generator=step_generator(0, 1))
    diffusion_loss(Spy(), sch, x, y, null_class=3, p_uncond=1.0, generator=step_generator(0, 1))
    diffusion_loss(Spy(), sch, x, y, null_class=3, p_uncond=0.5, generator=step_generator(0, 1))
    assert torch.all(seen[0] == 0) and torch.all(seen[1] == 3)
    assert 10 < int((seen[2] == 3).sum()) < 54


def test_fit_lowers_loss_and_is_deterministic():
    x, y = data(2, 8)
    runs = []
    for _ in range(2):
        net, ema, opt, sch = tiny()
        result = fit(net, ema, opt, diffusion(net, sch, x, y), TrainSettings(max_steps=30, batch_size=8, log_every=10))
        runs.append(result.losses)
        assert result.first_step_s > 0  # logged: the compile warm-up on a GPU
    assert runs[0] == runs[1]
    assert runs[0][-1][1] < runs[0][0][1]


def test_resume_continues_step_count_and_loss_curve(tmp_path):
    x, y = data(2, 8)
    settings = dict(batch_size=4, log_every=1, ckpt_every=3)
    payload = lambda: {"config": {"model": SPEC}, "meta": {}}  # noqa: E731
    net, ema, opt, sch = tiny()
    straight = fit(net, ema, opt, diffusion(net, sch, x, y), TrainSettings(max_steps=6, **settings)).losses

    net, ema, opt, sch = tiny()
    first = fit(
        net,
        ema,
        opt,
        diffusion(net, sch, x, y),
        TrainSettings(max_steps=3, **settings),
        ckpt_path=tmp_path / "last.pt",
        checkpoint_payload=payload,
    ).losses
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt.step == 3
    net, ema, opt, sch = tiny()
    net.load_state_dict(ckpt.model)
    ema.load_state_dict(ckpt.ema)
    opt.load_state_dict(ckpt.optimizer)
    second = fit(
        net,
        ema,
        opt,
        diffusion(net, sch, x, y),
        TrainSettings(max_steps=6, **settings),
        start_step=ckpt.step,
        ckpt_path=tmp_path / "last.pt",
        checkpoint_payload=payload,
    ).losses
    assert [s for s, _ in first + second] == [1, 2, 3, 4, 5, 6]
    for (_, a), (_, b) in zip(first + second, straight):
        assert a == pytest.approx(b, rel=1e-5)
    assert load_checkpoint(tmp_path / "last.pt").step == 6


def test_interrupt_saves_checkpoint(tmp_path):
    x, y = data(2, 8)
    net, ema, opt, sch = tiny()

    class Interrupting:
        run_id = None

        def log_metrics(self, metrics, step=None):
            if step == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(
            net,
            ema,
            opt,
            diffusion(net, sch, x, y),
            TrainSettings(max_steps=10, batch_size=4, log_every=1, ckpt_every=0),
            ckpt_path=tmp_path / "last.pt",
            tracker=Interrupting(),
            checkpoint_payload=lambda: {"config": {"model": SPEC}, "meta": {}},
        )
    assert load_checkpoint(tmp_path / "last.pt").step == 1  # the last completed step before the interrupt


def test_nan_loss_stops_with_advice():
    x, y = data(2, 4)
    x[0, 0, 0, 0] = float("nan")
    net, ema, opt, sch = tiny()
    with pytest.raises(FloatingPointError, match="training.lr"):
        fit(net, ema, opt, diffusion(net, sch, x, y), TrainSettings(max_steps=2, batch_size=4, log_every=1))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_activation_checkpointing_and_channels_last_keep_the_maths(spatial_dims):
    from medaug.training import memory_format_of, prepare_for_speed

    x, y = data(spatial_dims, 4)
    grads = []
    for switches in ({}, {"activation_checkpointing": True, "channels_last": True}):
        net, _, _, sch = tiny(spatial_dims)
        model = prepare_for_speed(net, **switches)
        conv = next(p for p in net.parameters() if p.ndim == spatial_dims + 2 and p.shape[1] > 1)
        assert conv.is_contiguous(memory_format=memory_format_of(conv.ndim)) == bool(switches)
        loss = diffusion_loss(model, sch, x, y, null_class=3, p_uncond=0.0, generator=step_generator(0, 0)).mean()
        loss.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
        assert list(net.state_dict()) == list(tiny()[0].state_dict())  # checkpoint names unchanged
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_draw_batch_takes_a_rank_share_of_one_permutation(spatial_dims):
    x, y = data(spatial_dims, 8)
    layout = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    parts = [
        draw_batch(x, y, torch.Generator().manual_seed(3), slice(r * 3, r * 3 + 3), torch.device("cpu"), layout)
        for r in range(2)
    ]
    rows = torch.cat([p[1] for p in parts])
    xs = torch.cat([p[0] for p in parts])
    assert parts[0][0].shape == (3, 1, *[8] * spatial_dims) and parts[0][0].is_contiguous(memory_format=layout)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))[:6]
    assert torch.equal(rows, y[perm]) and torch.equal(xs, x[perm])  # the ranks' shares are disjoint rows


def test_compile_kernel_cache_is_set_unless_the_user_set_one(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    net = tiny()[0]
    prepare_for_speed(net, compile_cache=tmp_path / "a")  # eager: nothing to cache
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    compiled = prepare_for_speed(net, compile_mode="default", compile_cache=tmp_path / "a")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "a")
    prepare_for_speed(net, compile_mode="default", compile_cache=tmp_path / "b")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "a")
    assert list(compiled.parameters())[0] is list(net.parameters())[0]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_loss_target_follows_the_prediction_type(kind):
    x0 = torch.rand(6, 1, 4, 4) * 2 - 1
    draws = draw_step_noise(x0.shape, 100, 0.0, torch.Generator().manual_seed(3))
    abar = DDPMScheduler(num_train_timesteps=100).alphas_cumprod[draws.timesteps].view(-1, 1, 1, 1)
    truth = {"epsilon": draws.noise, "sample": x0, "v_prediction": abar.sqrt() * draws.noise - (1 - abar).sqrt() * x0}

    class Oracle(torch.nn.Module):  # predicts exactly the quantity named `answer`
        def __init__(self, answer):
            super().__init__()
            self.answer = answer

        def forward(self, x, timesteps, class_labels):
            assert torch.equal(timesteps, draws.timesteps)
            return truth[self.answer]

    sch = DDPMScheduler(num_train_timesteps=100, prediction_type=kind)
    for answer in truth:
        loss = diffusion_loss(Oracle(answer), sch, x0, torch.zeros(6, dtype=torch.long), null_class=3, draws=draws)
        assert (loss.max() < 1e-10) == (answer == kind)
    sch.prediction_type = "score"
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_loss(Oracle("epsilon"), sch, x0, torch.zeros(6, dtype=torch.long), null_class=3, draws=draws)


def test_a_failing_tracker_never_stops_training_or_its_checkpoint(tmp_path, caplog):
    x, y = data(2, 8)
    net, ema, opt, sch = tiny()
    calls = []

    class ServerGone:
        run_id = None

        def log_metrics(self, metrics, step=None):
            calls.append(step)
            raise ConnectionError("mlflow server at http://10.0.0.1:5000 went away")

    result = fit(
        net,
        ema,
        opt,
        diffusion(net, sch, x, y),
        TrainSettings(max_steps=5, batch_size=4, log_every=1, ckpt_every=2),
        ckpt_path=tmp_path / "last.pt",
        tracker=ServerGone(),
        checkpoint_payload=lambda: {"config": {"model": SPEC}, "meta": {}},
    )
    assert result.step == 5 and len(result.losses) == 5
    assert load_checkpoint(tmp_path / "last.pt").step == 5
    assert calls == [1]  # switched off after its first error: a dead server is not waited for at every step
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "went away" in r.getMessage()]
    assert len(warnings) == 1


def test_sigterm_in_fit_finishes_the_step_saves_and_raises(tmp_path):
    import signal

    from medaug.training import Terminated

    x, y = data(2, 8)
    net, ema, opt, sch = tiny()

    class SendsSigterm:  # the signal arrives during step 3's logging
        run_id = None

        def log_metrics(self, metrics, step=None):
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Terminated, match="SIGTERM after step 3"):
        fit(
            net,
            ema,
            opt,
            diffusion(net, sch, x, y),
            TrainSettings(max_steps=10, batch_size=4, log_every=1, ckpt_every=0),
            ckpt_path=tmp_path / "last.pt",
            tracker=SendsSigterm(),
            checkpoint_payload=lambda: {"config": {"model": SPEC}, "meta": {}},
        )
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt.step == 3
    for a, b in zip(ckpt.model.values(), net.state_dict().values()):  # the weights of exactly step 3
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after fit


def test_compile_mode_of_maps_the_config_switch():
    from medaug.training import compile_mode_of

    assert [
        compile_mode_of(v, cuda) for v, cuda in (("auto", True), ("auto", False), (True, False), (False, True))
    ] == ["default", None, "default", None]
    assert compile_mode_of("max-autotune", False) == "max-autotune"


def test_resume_training_restores_and_refuses_other_data(tmp_path):
    from medaug.model import EMA, save_checkpoint
    from medaug.training import resume_training

    net = torch.nn.Linear(2, 2)
    ema = EMA(net, 0.9)
    ckpt = save_checkpoint(
        tmp_path / "last.pt",
        model=net,
        ema=ema,
        optimizer=None,
        step=7,
        config={"model": {"_target_": "torch.nn.Linear"}},
        meta={"image_shape": [8, 8], "class_names": ["a", "b"], "dataset": "fp", "mlflow_run_id": "r1"},
    )
    fresh = torch.nn.Linear(2, 2)
    kw = dict(image_shape=[8, 8], class_names=["a", "b"], dataset="fp", autoencoder_id=None, prepared=tmp_path)
    assert resume_training(tmp_path / "none.pt", fresh, EMA(fresh, 0.9), None, **kw) == (0, {})
    step, meta = resume_training(ckpt, fresh, EMA(fresh, 0.9), None, **kw)
    assert (step, meta["mlflow_run_id"]) == (7, "r1")
    assert torch.equal(fresh.weight, net.weight)
    with pytest.raises(ValueError, match=r"last.pt was trained with class_names \['a', 'b'\], but .* has \['a'\]"):
        resume_training(ckpt, fresh, EMA(fresh, 0.9), None, **{**kw, "class_names": ["a"]})
    with pytest.raises(ValueError, match="trained on pixels, but this run trains on the latents of autoencoder ae1"):
        resume_training(ckpt, fresh, EMA(fresh, 0.9), None, **{**kw, "autoencoder_id": "ae1"})
