"""``batch --ray ADDRESS``: the same jobs as Ray tasks (optional extra: ``pip install 'qconvert[ray]'``).

Each job is one task running :func:`qconvert.batch.run_job`, the code a local run uses, so report
rows, exit codes and output bytes are the same; paths are used as given, so the cluster's workers must
see the same storage at the same paths, and have the same qconvert version installed (checked).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from qconvert import __version__
from qconvert.batch import Job, Settings, Status, not_run, report_not_started, run_job, stops_the_rest
from qconvert.errors import BadInputError, QConvertError


def _task(job: Job, settings: Settings) -> tuple[str, list[dict]]:
    from qconvert import __version__ as worker_version

    return worker_version, run_job(job, settings)


def resources(job: Job) -> dict:
    """What a job's task asks the cluster for: a CPU, and a GPU when its options put it on CUDA."""
    device = ""
    for output in job.outputs:
        device = str(getattr(output.request, "device", "") or device)
    return {"num_cpus": 1, "num_gpus": 1 if device.startswith("cuda") else 0}


def connect(address: str) -> None:
    try:
        import ray
    except ImportError:
        raise BadInputError("--ray needs Ray: pip install 'qconvert[ray]'") from None
    try:
        if address == "local":  # a new cluster on this machine, whatever RAY_ADDRESS says
            # Tasks return a few report rows: a small object store is plenty.
            ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                     object_store_memory=128 * 2**20)
        elif address == "auto":
            if not os.environ.get("RAY_ADDRESS"):
                raise BadInputError("--ray auto: RAY_ADDRESS is not set (or give the address, or 'local')")
            ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
        else:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise BadInputError(f"--ray {address}: cannot connect to a Ray cluster: {str(exc).splitlines()[0]}") from None


def run_on_ray(jobs: list[Job], settings: Settings, address: str, concurrency: int | None,
               on_rows: Callable[[list[dict]], None]) -> None:
    """Submit the jobs (at most ``concurrency`` in flight; default all, the cluster schedules them) and
    hand each job's rows to ``on_rows`` as it finishes. ``fail_fast``: no job is submitted after a failure."""
    import ray

    connect(address)
    queue = list(jobs)
    running: dict[object, Job] = {}
    try:
        task = ray.remote(_task)
        limit = concurrency or len(jobs)
        stop = False
        while queue or running:
            while queue and not stop and len(running) < limit:
                job = queue.pop(0)
                options = resources(job)
                ref = task.options(name=f"qconvert batch {job.label}", max_retries=0, **options).remote(job, settings)
                running[ref] = job
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1)
            job = running.pop(ready[0])
            try:
                version, rows = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                rows = [{**r, "status": Status.FAILED.value, "exit_code": 1, "reason": None,
                         "error": f"ray task failed: {message}"} for r in not_run(job, "")]
            else:
                if version != __version__:
                    raise QConvertError(f"--ray {address}: workers run qconvert {version}, this is {__version__}")
            on_rows(rows)
            stop = stop or stops_the_rest(rows, settings)
        report_not_started(queue, on_rows)
    except BaseException:
        # An interrupt reaches running tasks as KeyboardInterrupt, so they remove their temporary folders.
        for ref in running:
            ray.cancel(ref, force=False)
        ray.wait(list(running), num_returns=len(running), timeout=30)
        raise
    finally:
        ray.shutdown()
