"""Segment many slides on a SLURM cluster: GPU workers from dask-jobqueue, CPU workers from one sbatch job.

    python slurm_batch.py SLIDES OUTDIR --gpus 8 --cpu-workers 32 [--gpu-partition gpu] [--cpu-partition cpu]
                          [--account LAB] [--walltime 04:00:00] [--model default] [-- extra histopan batch args]

Run it on a login node (or in a small long-running job) inside the environment where histopan is installed;
the Dask scheduler runs in this process.  What it does:

1. a ``dask_jobqueue.SLURMCluster`` submits one job per GPU (``--gres=gpu:1``, so SLURM pins the device);
   each job runs one single-threaded worker with ``--resources GPU=1``;
2. one ``sbatch`` job on the CPU partition runs ``dask worker`` with --cpu-workers single-threaded processes,
   each with ``--resources CPU=1`` (reading slides, post-processing, writing stores);
3. ``histopan batch SLIDES -o OUTDIR --scheduler <this scheduler>`` runs, prints the dashboard link and a
   progress bar per slide, and writes OUTDIR/batch_report.csv and .json;
4. the jobs are cancelled at the end (also on Ctrl-C).

dask-jobqueue cannot mix worker kinds in one cluster object, which is why the CPU workers are one plain sbatch
job pointed at the same scheduler.  Every node must see SLIDES, OUTDIR and the model at the same paths
(a shared filesystem).  Exit code: histopan's (1 if any slide failed; rerun the same command to finish).
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slides")
    parser.add_argument("outdir")
    parser.add_argument("--gpus", type=int, default=4, help="GPU worker jobs (one GPU each)")
    parser.add_argument("--cpu-workers", type=int, default=16, help="CPU worker processes (one sbatch job)")
    parser.add_argument("--gpu-partition", default="gpu")
    parser.add_argument("--cpu-partition", default="cpu")
    parser.add_argument("--account", default=None)
    parser.add_argument("--walltime", default="04:00:00")
    parser.add_argument("--gpu-memory", default="32GB", help="host memory per GPU job")
    parser.add_argument("--cpu-memory-per-worker-gb", type=int, default=6)
    parser.add_argument("--model", default="default")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more 'histopan batch' arguments after --")
    args = parser.parse_args()

    from dask_jobqueue import SLURMCluster  # pip install dask-jobqueue
    from distributed import Client

    from histopan.cli import main as histopan_main

    account = [f"--account={args.account}"] if args.account else []
    gpu = SLURMCluster(
        queue=args.gpu_partition, account=args.account, walltime=args.walltime,
        cores=1, processes=1, job_cpu=4, memory=args.gpu_memory,  # 1 worker thread; 4 cores for data loading
        job_extra_directives=["--gres=gpu:1"], worker_extra_args=["--resources", "GPU=1"],
        scheduler_options={"dashboard_address": ":8787"},
    )
    cpu_job = None
    try:
        gpu.scale(jobs=args.gpus)
        worker = (f"dask worker {gpu.scheduler_address} --nworkers {args.cpu_workers} --nthreads 1 "
                  f"--memory-limit {args.cpu_memory_per_worker_gb}GB --resources CPU=1")
        sbatch = ["sbatch", "--parsable", f"--partition={args.cpu_partition}", f"--time={args.walltime}",
                  "--nodes=1", f"--cpus-per-task={args.cpu_workers}",
                  f"--mem={args.cpu_workers * args.cpu_memory_per_worker_gb}G", "--job-name=histopan-cpu",
                  *account, "--export=ALL,CUDA_VISIBLE_DEVICES=", f"--wrap={worker}"]
        cpu_job = subprocess.run(sbatch, check=True, capture_output=True, text=True).stdout.strip().split(";")[0]
        print(f"scheduler {gpu.scheduler_address}, dashboard {gpu.dashboard_link}; CPU job {cpu_job}; "
              f"waiting for all {args.gpus + args.cpu_workers} workers (queue time)...", file=sys.stderr)
        # histopan batch reads the workers' resources when it starts: wait until both kinds have joined
        with Client(gpu) as client:
            client.wait_for_workers(args.gpus + args.cpu_workers)
        extra = [a for a in args.extra if a != "--"]
        return histopan_main(["batch", args.slides, "-o", args.outdir, "--scheduler", gpu.scheduler_address,
                              "--model", args.model, *extra])
    finally:
        if cpu_job:
            subprocess.run(["scancel", cpu_job], check=False)
        gpu.close()


if __name__ == "__main__":
    sys.exit(main())
