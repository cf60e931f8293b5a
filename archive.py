"""Photo archives on Ray: predict.py --engine ray runs the local engine's job on Ray Data, an actor pool of Landmarkers (one per CPU, or per GPU where Ray has GPUs) on one machine or a cluster, with retries; the records stream back to the driver, which writes them as the local engine does."""
import importlib.util
import json
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from errors import Error, UsageError
from photos import PHOTO_BATCH, PhotoSettings, do_photos, start_worker

# Ray is imported where it runs: the local engine, the default, never pays its import (about 2 s).

# An actor whose process dies is started again as often as it takes (a run on a cluster outlives lost machines),
# and the batch it held is run again up to RETRIES times: a photo that kills its worker every time ends the run
# with one line instead of looping.
RESTARTS, RETRIES = -1, 3


class Landmarks:
    """One actor of the pool: its own Landmarker, built once (photos.start_worker), run on a few photos at a
    time as the local engine's workers run them (photos.do_photos): reading, decoding, the detector, the
    network and the drawn picture. Each record comes back as JSON text with the seconds its batch took."""

    def __init__(self, settings: PhotoSettings, threads: int):
        start_worker(settings, threads)

    def __call__(self, batch: dict) -> dict:
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
        if importlib.util.find_spec("ray") is None:
            raise UsageError("engine=ray: needs Ray: pip install 'ray[data]'", "engine")
        self.started = connect(address)
        try:
            self.resources = pool(settings, workers)
        except BaseException:
            self.close()
            raise
        self.workers = self.resources["concurrency"]
        # The actors run where Ray started them, maybe another folder or machine: absolute paths (on storage
        # every machine shares, docs/scale.md), and the records given back the names as given.
        self.settings = replace(settings, out_dir=str(Path(settings.out_dir).resolve()))
        self.out_dir = settings.out_dir

    def photos(self, files: list[Path], names: dict[Path, str]) -> Iterator[tuple[dict, dict]]:
        """(record, seconds by step) for each file, as photos.landmark_photos gives them: the files go to the
        actor pool PHOTO_BATCH at a time, and the records stream back in the order they finish."""
        import ray
        resources = dict(self.resources)
        threads = resources.pop("threads")
        given = {str(path.resolve()): str(path) for path in files}
        items = [{"path": str(path.resolve()), "drawn": names[path]} for path in files]
        if not items:
            return
        # A block a batch: each batch's records come back as soon as it is done, not when a larger block is.
        blocks = -(-len(items) // PHOTO_BATCH)
        data = ray.data.from_items(items, override_num_blocks=blocks)
        resources["concurrency"] = min(resources["concurrency"], blocks)  # no actor without a batch to run
        with warnings.catch_warnings():
            # Ray 2.60 deprecates passing actor options this way, yet names no other way to give the retries.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            found = data.map_batches(Landmarks, fn_constructor_args=(self.settings, threads),
                                     batch_size=PHOTO_BATCH, batch_format="numpy", zero_copy_batch=True,
                                     max_restarts=RESTARTS, max_task_retries=RETRIES, **resources)
        try:
            for batch in found.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
                for record, spent in zip(batch["record"], batch["spent"]):
                    yield self.as_given(json.loads(record), given), json.loads(spent)
        except Exception as e:  # Ray wraps what the actors raised; the project's own error is said as it is
            raise project_error(e) from None

    def as_given(self, record: dict, given: dict[str, str]) -> dict:
        """A record as the local engine writes it: the photo's path and its drawn picture's as the user gave them."""
        resolved = record["image"]
        record["image"] = given.get(resolved, resolved)
        if "error" in record:
            record["error"] = record["error"].replace(resolved, record["image"])
        if "annotated" in record:
            record["annotated"] = str(Path(self.out_dir) / Path(record["annotated"]).name)
        return record

    def close(self) -> None:
        import ray
        if self.started:
            ray.shutdown()
            self.started = False


def project_error(error: Exception) -> Exception:
    """The errors.Error that an actor raised, from inside Ray's wrappers (its cause, or its cause's), else a
    one-line Error saying what Ray said; a batch whose worker died RETRIES times is named so."""
    seen = error
    while seen is not None:
        if isinstance(seen, Error):
            return seen
        seen = seen.__cause__ or seen.__context__
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return Error(f"engine=ray: the run stopped: {first} (a photo that kills its worker each time: run the rest with "
                 f"--resume, or that photo alone)", "engine")
