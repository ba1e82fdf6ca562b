"""ttds-ray: train, evaluate, tune and serve TTDS generative recommenders on Ray.

``from ttds_ray import Recommender`` loads a finished run without importing Ray (see
:mod:`ttds_ray.recommender`); the Ray layer lives in :mod:`ttds_ray.train`. Attributes load lazily so
that ``import ttds_ray`` stays cheap.
"""
from __future__ import annotations

from .errors import TTDSError

__all__ = ["Recommender", "Recommendation", "TTDSError"]


def __getattr__(name: str):
    if name in ("Recommender", "Recommendation"):
        from . import recommender
        return getattr(recommender, name)
    raise AttributeError(f"module 'ttds_ray' has no attribute {name!r}")
