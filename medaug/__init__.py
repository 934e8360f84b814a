"""medaug: class-conditional diffusion models for synthetic medical images.

The library never imports Hydra: the stages in ``pipelines/`` read the config and call
these modules, following the data flow io → preprocessing → dataset → model →
training → sampling → metrics → export, with tracking beside them.
"""

__version__ = "0.1.0"
