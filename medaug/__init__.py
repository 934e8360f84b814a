"""medaug: class-conditional diffusion models for synthetic medical images.

The library never imports Hydra: the stages in ``pipelines/`` read the config and call
these modules, following the data flow io → preprocessing → dataset → model →
training → sampling → metrics → export, with tracking beside them.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy ``medaug.augment(...)``: the augment stage pulls in torch and MONAI only when used."""
    if name == "augment":
        import importlib

        return importlib.import_module(".augment", __name__)
    raise AttributeError(f"module 'medaug' has no attribute {name!r}")
