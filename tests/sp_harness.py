"""Run a function on S CPU processes (gloo on loopback) with a deadline, collecting JSON results."""
from __future__ import annotations

import json
import os
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RESULT_PATH = "OSP_TEST_RANK_RESULT"


def die_now(result: dict) -> None:
    """Record this rank's result and end the process at once, as a crashed rank would.

    A rank that returns normally tears its process group down while its peers may still be inside
    a collective with it; gloo can then abort the leaving process ("terminate called without an
    active exception"), which says nothing about the peers. Skipping the teardown models a dead
    peer exactly: the kernel closes its sockets and the others see the connection go. The rank
    that stays ends the same way: with a dead peer in its group, gloo's teardown can abort it after
    its result is written (seen once in 8 runs)."""
    Path(os.environ[_RESULT_PATH]).write_text(json.dumps(result, default=str))
    os._exit(0)


def _entry(rank, fn, world, port, out_dir, timeout_s, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ[_RESULT_PATH] = str(Path(out_dir, f"rank{rank}.json"))
    import torch

    torch.set_num_threads(1)
    result = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        result = fn(rank, world, *args) or {}
    except BaseException as exc:  # report, never hang the parent
        result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-4000:]}
    finally:
        Path(os.environ[_RESULT_PATH]).write_text(json.dumps(result, default=str))
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, out_dir, *args, timeout_s: int = 120) -> list[dict]:
    port = free_port()
    ctx = mp.start_processes(_entry, args=(fn, world, port, str(out_dir), timeout_s, args), nprocs=world,
                             join=False, start_method="spawn")
    import time

    deadline = time.time() + timeout_s * 2 + 60
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"ranks did not finish within {timeout_s * 2 + 60} s")
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
