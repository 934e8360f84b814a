"""One config tree per job: every stage accepts every stage's keys, composes the config `medaug run` does, and
reads only its own section."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipelines import prepare

from .conftest import CONF_DIR, TINY

JOB_STAGES = ("prepare", "train", "sample", "evaluate", "export", "augment")
# one override of every stage's own settings, given to every stage
EVERY_SECTION = [
    "prepare.strict=true",
    "latent.cache_dir=/tmp/latents",
    "ckpt_path=/tmp/last.pt",
    "sample.num_per_class=4",
    "evaluate.n_pairs=8",
    "export.format=[png]",
    "augment.ratio=0.5",
    "input=/tmp/in",
    "output=/tmp/out",
]


def composed(stage: str, overrides) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name=stage, overrides=list(overrides)), resolve=True)


@pytest.mark.parametrize("stage", [*JOB_STAGES, "train_autoencoder", "run"])
def test_every_stage_accepts_every_stages_keys(tmp_path, stage):
    cfg = composed(stage, ["experiment=demo_2d", f"paths.output_dir={tmp_path}", *EVERY_SECTION])
    assert cfg["prepare"]["strict"] is True and cfg["sample"]["num_per_class"] == 4
    assert cfg["evaluate"]["n_pairs"] == 8 and cfg["export"]["format"] == ["png"] and cfg["augment"]["ratio"] == 0.5
    assert (cfg["input"], cfg["output"], cfg["ckpt_path"]) == ("/tmp/in", "/tmp/out", "/tmp/last.pt")


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_stage_composes_the_config_of_run(tmp_path, experiment):
    overrides = [f"experiment={experiment}", f"paths.output_dir={tmp_path}"]
    job = composed("run", overrides)
    for stage in JOB_STAGES:
        assert composed(stage, overrides) == job, stage
    # the one stage-specific default: train_autoencoder always writes an autoencoder checkpoint
    own = composed("train_autoencoder", overrides)
    assert own.pop("latent")["autoencoder_ckpt"] == f"{tmp_path}/autoencoder/checkpoints/last.pt"
    assert own == {k: v for k, v in job.items() if k != "latent"}


def test_stage_defaults_are_kept():
    """The defaults each stage had in its own primary config before the sections moved to base.yaml."""
    cfg = composed("run", [])
    assert cfg["ckpt_path"] is None and cfg["latent"] == {
        "autoencoder_ckpt": None,
        "train_if_missing": False,
        "cache_dir": "outputs/default/latents",
    }
    assert cfg["prepare"] == {"deid": "refuse", "strict": False, "uneven_spacing": "error"}
    assert cfg["sample"]["num_per_class"] == 16 and cfg["sample"]["sampler"] == "dpmpp_2m_sde"
    assert cfg["evaluate"]["utility"]["steps"] == cfg["evaluate"]["classifier_steps"] == 400
    assert cfg["export"]["format"] == ["nifti"] and cfg["export"]["overwrite"] is True
    assert (cfg["input"], cfg["output"]) == ("outputs/default/prepared", "outputs/default/augment")
    assert cfg["augment"]["policy"] == "balance" and cfg["augment"]["overwrite"] is False


def test_prepare_given_another_stages_key_runs(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="prepare",
            overrides=[
                "experiment=demo_2d",
                *TINY,
                f"paths.output_dir={tmp_path}",
                "sample.num_per_class=4",
                "export.format=[png]",
            ],
        )
    summary = prepare.run(cfg)
    assert sum(v for k, v in summary.items() if k.startswith("data/train/")) > 0
    assert (tmp_path / "prepared" / "DONE").is_file()


def test_check_shape_keys_wants_one_entry_per_axis():
    from medaug.preparation import check_shape_keys

    check_shape_keys(3, [8, 8, 8], None)
    with pytest.raises(ValueError, match=r"data.pixdim=\[1.0, 1.0\] has 2 entries; data.spatial_dims=3 needs 3"):
        check_shape_keys(3, [8, 8, 8], [1.0, 1.0])
    with pytest.raises(ValueError, match="data.spatial_dims=4; choose 2 or 3"):
        check_shape_keys(4, None, None)
