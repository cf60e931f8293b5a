"""Photo archives on Ray: predict.py --engine ray runs the local engine's job on Ray Data, an actor pool of Landmarkers (one per CPU, or per GPU where Ray has GPUs) on one machine or a cluster, with retries; the records stream back to the driver, which writes them as the local engine does."""
from collections.abc import Iterator
from pathlib import Path

from errors import UsageError
from photos import PHOTO_BATCH, PhotoSettings, do_photos, start_worker

# Ray is imported where it runs: the local engine, the default, never pays its import (about 2 s).

# An actor whose process dies is started again, and the batch it held run again, as often as it takes: a photo
# that kills its worker every time would loop, but a run on a cluster outlives lost machines.
RESTARTS = -1


class Landmarks:
    """One actor of the pool: its own Landmarker, built once (photos.start_worker), run on a few photos at a
    time as the local engine's workers run them (photos.do_photos): reading, decoding, the detector, the
    network and the drawn picture. Each record comes back as JSON text with the seconds its batch took."""

    def __init__(self, settings: PhotoSettings, threads: int):
        start_worker(settings, threads)

    def __call__(self, batch: dict) -> dict:
        import json
        import numpy as np
        done = do_photos(list(zip(batch["path"], batch["drawn"])))
        return {"record": np.array([json.dumps(record) for record, _ in done], dtype=object),
                "spent": np.array([json.dumps(spent) for _, spent in done], dtype=object)}


def connect(address: str | None) -> bool:
    """Ray joined: the cluster at `address`, or the one running on this machine (address "auto"), or else a
    local Ray started for this run. True where this run started it (and shuts it down after)."""
    import ray
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address or "auto", logging_level="ERROR", log_to_driver=False)
        return False
    except ConnectionError as e:
        if address not in (None, "auto"):
            raise UsageError(f"ray_address={address}: no Ray cluster answers there ({e})", "ray_address") from None
    ray.init(logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    return True


def pool(settings: PhotoSettings, workers: int | None) -> dict:
    """The actor pool's size and resources: one actor per GPU where the cluster has GPUs (the Landmarker on
    cuda), else one per CPU, each with one thread; `workers` caps it."""
    import ray
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if gpus and settings.options.device in ("auto", "cuda"):
        return dict(concurrency=min(gpus, workers or gpus), num_gpus=1, threads=max(1, cpus // gpus))
    return dict(concurrency=max(1, min(cpus, workers or cpus)), num_cpus=1, threads=1)


class RayEngine:
    """predict.py --engine ray: Ray joined (connect) and the actor pool sized (pool) when made; photos() runs
    the job; close() shuts down a Ray this run started."""

    def __init__(self, settings: PhotoSettings, address: str | None = None, workers: int | None = None):
        self.settings, self.started = settings, connect(address)
        self.resources = pool(settings, workers)
        self.workers = self.resources["concurrency"]

    def photos(self, files: list[Path], names: dict[Path, str]) -> Iterator[tuple[dict, dict]]:
        """(record, seconds by step) for each file, as photos.landmark_photos gives them: the files go to the
        actor pool PHOTO_BATCH at a time, and the records stream back in the order they finish."""
        import json
        import ray
        resources = dict(self.resources)
        threads = resources.pop("threads")
        items = [{"path": str(path), "drawn": names[path]} for path in files]
        if not items:
            return
        data = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * self.workers)))
        found = data.map_batches(Landmarks, fn_constructor_args=(self.settings, threads), batch_size=PHOTO_BATCH,
                                 batch_format="numpy", zero_copy_batch=True, max_restarts=RESTARTS,
                                 max_task_retries=RESTARTS, **resources)
        for batch in found.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            for record, spent in zip(batch["record"], batch["spent"]):
                yield json.loads(record), json.loads(spent)

    def close(self) -> None:
        import ray
        if self.started:
            ray.shutdown()
