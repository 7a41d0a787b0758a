"""Training on a Ray cluster through Horovod's own Ray integration (``horovod.ray``).

:func:`run` starts one Horovod worker per slot as Ray actors (Gloo underneath), runs a function on every worker
and returns each worker's result, rank order. ``hvdtrain train --ray`` runs :func:`hvdtrain.train.run` this way;
a user's script calls :func:`hvdtrain.ray.run` with its own function. The cluster is the one at ``address``
(``auto``, ``ray://host:10001``, or ``host:6379``), or a local one started here (on this machine only, usage
statistics off). Elastic jobs (``min_workers``/``max_workers``) go on when workers die and take in new ones.

Ray is an optional extra: ``pip install 'hvdtrain[ray]'``.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from hvdtrain.errors import UsageError


def _ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: install the extra: pip install 'hvdtrain[ray]'") from None
    return ray


def run(fn: Callable[[], Any], *, num_workers: int | None = None, address: str | None = None,
        cpus_per_worker: int = 1, use_gpu: bool = False, min_workers: int | None = None,
        max_workers: int | None = None, env: dict[str, str] | None = None,
        network_interface: str | None = None) -> list[Any]:
    """Run ``fn`` on Horovod workers placed by Ray; returns every worker's result (rank order).

    Args:
        fn: a picklable function without arguments; it calls ``hvdtrain.init()`` (or ``train.run``) itself.
        num_workers: workers of a fixed-size job, one per slot.
        address: an existing Ray cluster; None starts a local one on this machine.
        cpus_per_worker, use_gpu: what each worker reserves.
        min_workers, max_workers: an elastic job instead (Horovod's elastic mode on Ray): it goes on while at
            least ``min_workers`` are alive and grows up to ``max_workers`` as slots free up.
        env: environment variables for the workers (``TF_CPP_MIN_LOG_LEVEL``, S3 settings, ...).
        network_interface: the interface the workers talk over (default: ``lo`` for a local cluster, Horovod's
            choice otherwise).
    """
    ray = _ray()
    from horovod.ray import RayExecutor

    elastic = min_workers is not None
    if not elastic and not num_workers:
        raise UsageError("give the number of workers (--np N), or --min-np/--max-np for an elastic job")
    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True,
                                  "runtime_env": {"env_vars": dict(env or {})}}
        if address:
            ray.init(address=address, **kwargs)
        else:
            # A cluster started here runs its training workers at normal priority, not Ray's nice 15 (under which
            # any other busy process on the machine starves them: an epoch of 9 s had not ended after 300 s).
            os.environ.setdefault("RAY_worker_niceness", "0")
            cpus = max(os.cpu_count() or 1, (max_workers or num_workers or 1) * cpus_per_worker)
            ray.init(num_cpus=cpus, **kwargs)
        started = True
    # On one machine the workers talk over loopback; probing other interfaces makes elastic starts time out.
    nic = network_interface or (None if address else "lo")
    settings = RayExecutor.create_settings(timeout_s=120, nics={nic} if nic else None)
    if elastic:
        executor = RayExecutor(settings, min_workers=min_workers, max_workers=max_workers,
                               cpus_per_worker=cpus_per_worker, use_gpu=use_gpu,
                               gpus_per_worker=1 if use_gpu else None)
    else:
        executor = RayExecutor(settings, num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                               use_gpu=use_gpu, gpus_per_worker=1 if use_gpu else None)
    try:
        executor.start()
        return executor.run(fn)
    finally:
        executor.shutdown()
        if started:
            ray.shutdown()
