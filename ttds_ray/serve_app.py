"""Ray layer of online serving: :class:`TTDSDeployment` runs ``serving.TTDSService`` as one Ray Serve
deployment with a FastAPI ingress; concurrent ``/recommend`` requests meet in one ``@serve.batch`` call
(one trie-constrained beam search over the batch, ``Recommender.recommend_many``).

Started from a Serve config file (``serve run serve_apps/ttds.yaml``, ``serve deploy`` against a running
cluster) whose ``import_path`` is ``ttds_ray.serve_app:build_app`` and whose ``args`` are
``serving.ServeSettings``; replicas, ``max_ongoing_requests`` and actor resources are the usual
per-deployment options of the config file (``deployments: [{name: TTDS, ...}]``).
"""
from __future__ import annotations

import asyncio
from pathlib import Path

from ray import serve

from .recommender import Recommendation, RecRequest
from .errors import TTDSError
from .serving import ServeSettings, TTDSService, create_app


@serve.deployment(name="TTDS", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress()
class TTDSDeployment(TTDSService):
    """One replica: the loaded run, the FastAPI app and the batched ranker.

    Args:
        settings: ``ServeSettings`` as a dict; ``max_batch_size`` / ``batch_wait_timeout_s`` configure the
            ``@serve.batch`` method (1 = batching off).
    """

    def __init__(self, settings: dict):
        super().__init__(ServeSettings(**settings))
        self._recommend_batched.set_max_batch_size(self.settings.max_batch_size)
        self._recommend_batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _recommend_batched(self, requests: list[RecRequest]) -> list[Recommendation | TTDSError]:
        # in a thread: the forward + beam search release the GIL, and the replica keeps taking requests
        return await asyncio.to_thread(self.rank_batch, requests)

    async def recommend_one(self, request: RecRequest) -> Recommendation | TTDSError:
        return await self._recommend_batched(request)

    def __serve_build_asgi_app__(self):
        return create_app(self)


def build_app(args: dict) -> serve.Application:
    """Serve application builder (``import_path: ttds_ray.serve_app:build_app``).

    ``args`` are :class:`serving.ServeSettings` (checked here, before any replica starts); a relative
    ``run_dir`` is resolved against the directory ``serve run`` / ``serve deploy`` was started from.

    Raises:
        pydantic.ValidationError: an unknown key or a wrong type, naming the key.
    """
    settings = ServeSettings(**args)
    run_dir = Path(settings.run_dir).expanduser().resolve()
    if not (run_dir / "llm" / "MANIFEST.json").is_file():
        raise FileNotFoundError(f"run_dir {run_dir}: not a finished run (no llm/MANIFEST.json); train it first "
                                "with `ttds-ray train --config ...`")
    return TTDSDeployment.bind(settings.model_copy(update={"run_dir": str(run_dir)}).model_dump())
