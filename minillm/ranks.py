"""Tensor parallelism, the processes: rank 0 plans every step, every rank runs it.

Rank 0 is the ordinary engine: tokenizer, scheduler, radix tree, sampling. Every rank, rank 0 included,
holds its shard of the weights (tensor_parallel.py) and a KV pool of its own kv heads, with the same slots;
only rank 0 decides what goes where. Before each forward rank 0 broadcasts the step's plan, the list of
plan.Segment (tokens, positions, slot tables), and the other ranks, the followers, run the same
forward on their shards; the collectives inside the forward keep every rank in step:

    rank 0      schedule -> broadcast plan -> forward (2 all-reduces per layer, all-gather logits) -> sample
    rank 1..    wait for a plan ----------> forward (the same collectives) -----------------------> wait

Launching: under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set, on one machine or several)
every rank runs the same program, and LLM.load joins the group; on ranks other than 0 it does not return:
the process follows rank 0 and exits when rank 0 closes. Outside torchrun, LLM.load(tp=N) starts N - 1
follower processes on this machine itself (follower_main).

Failures: a collective waits at most `timeout` seconds (MINILLM_TP_TIMEOUT, default 60). A rank that dies
closes its connections and the others' next collective fails at once; one that hangs is noticed at the
timeout. So that followers can tell an idle rank 0 from a hung one, rank 0 broadcasts a heartbeat whenever
it has sent nothing for HEARTBEAT_S. Either way the survivors stop with one line (RankFailure).
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

from .cache.kv_pool import KVPool
from .engine import forward_batch
from .engine.plan import Segment
from .errors import MinillmError
from .model.model import CausalLM, SequenceKV
from .model.tensor_parallel import RankFailure, TensorParallel

ENV_TIMEOUT = "MINILLM_TP_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
HEARTBEAT_S = 1.0
STARTUP_TIMEOUT_S = 300.0  # joining the group and loading the weights, on every rank


def timeout_s() -> float:
    value = os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise MinillmError(f"{ENV_TIMEOUT} must be a positive number of seconds, got {value!r}")
    return seconds


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(rank: int, size: int, device: str, master: tuple[str, int] | None = None) -> None:
    """Join the process group: gloo on CPU, NCCL on CUDA. master None: from the environment (torchrun's
    MASTER_ADDR, MASTER_PORT); else rank 0 hosts the rendezvous at master, waiting up to STARTUP_TIMEOUT_S
    for the others, while collectives later wait at most timeout_s()."""
    if dist.is_initialized():
        raise MinillmError("this process already belongs to a tensor-parallel group; close() the other LLM first")
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s())
    if master is None:
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout)
    else:
        store = dist.TCPStore(
            master[0], master[1], size, rank == 0, timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S)
        )
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)


def wait_until_every_rank_loaded() -> None:
    """Wait until every rank has loaded its shard (which may take longer than the collective timeout)."""
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
        else:
            dist.barrier()
    except RuntimeError as e:
        raise RankFailure(
            f"tensor parallel: a rank failed while loading ({str(e).strip().splitlines()[0][:160]})"
        ) from None


class Leader:
    """Rank 0's side, a runner.Runner: every forward goes out as a plan first; a heartbeat while idle; stop at
    close()."""

    def __init__(self, model: CausalLM, followers: list[subprocess.Popen] | None = None):
        self.model, self.tp, self.followers = model, model.tp, followers or []
        self.ranks = self.tp.size
        self.lock = threading.Lock()  # a plan and the forward that follows it, never a heartbeat in between
        self.failure: BaseException | None = None
        self.last_sent = time.monotonic()
        self._closed = threading.Event()
        atexit.register(self.close)  # a program that never calls LLM.close() still stops its followers
        threading.Thread(target=self._heartbeat, name="minillm-tp-heartbeat", daemon=True).start()

    def check(self) -> None:
        """Raise if the group is broken (a rank failed, or a step failed half-way) or closed."""
        if self._closed.is_set():
            raise MinillmError("this LLM was closed, which stopped its tensor-parallel ranks; load it again")
        if isinstance(self.failure, RankFailure):
            raise RankFailure(str(self.failure))
        if self.failure is not None:
            raise RankFailure(
                f"tensor parallel: the ranks fell out of step after an error in a step ({self.failure!r}); "
                "load the model again"
            )

    def _run(self, plan: tuple, compute=None):
        """Send the plan, then (with the followers) compute; any failure breaks the group for good, since the
        ranks may no longer agree on which collective comes next."""
        with self.lock:
            self.check()
            try:
                self.tp.broadcast(plan)
                self.last_sent = time.monotonic()
                return compute() if compute is not None else None
            except BaseException as e:
                self.failure = e
                raise

    def make_pool(self, num_slots: int, dtype: torch.dtype, device: str, poison_freed: bool) -> KVPool:
        """A KV pool with the same slots on every rank, each holding its own kv heads."""
        self._run(("pool", num_slots, dtype))
        return KVPool(self.model.rank_config, num_slots, dtype, device, poison_freed)

    def forward(self, pool: KVPool, segments: list[Segment], views: bool) -> torch.Tensor:
        """forward_batch.run on every rank; the logits on rank 0."""
        return self._run(("forward", segments, views), lambda: forward_batch.run(self.model, pool, segments, views))

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """LLM.logits on every rank: one forward over ids [N], nothing cached."""
        positions = torch.arange(len(ids), device=ids.device)
        return self._run(("logits", ids.cpu()), lambda: self.model(ids, positions, SequenceKV()))

    def _heartbeat(self) -> None:
        while not self._closed.wait(HEARTBEAT_S / 2):
            if self.failure is None and self.lock.acquire(blocking=False):
                try:
                    if time.monotonic() - self.last_sent >= HEARTBEAT_S:
                        self.tp.broadcast(("heartbeat",))
                        self.last_sent = time.monotonic()
                except BaseException as e:  # noqa: BLE001 - the next step reports it
                    self.failure = e
                finally:
                    self.lock.release()

    def close(self) -> None:
        """Tell the followers to exit, wait for them, and leave the group."""
        if self._closed.is_set():
            return
        self._closed.set()
        atexit.unregister(self.close)
        with self.lock:
            if self.failure is None:
                try:
                    self.tp.broadcast(("stop",))
                except RankFailure:
                    pass
        for p in self.followers:
            try:
                p.wait(timeout=timeout_s())
            except subprocess.TimeoutExpired:
                p.kill()
        dist.destroy_process_group()


@torch.inference_mode()
def follow(model: CausalLM, device: str) -> None:
    """A follower's life: run every plan rank 0 sends, until it says stop. A plan that does not come within
    the timeout (rank 0 gone or hung) raises RankFailure."""
    pool = None
    while True:
        plan = model.tp.broadcast()
        kind = plan[0]
        if kind == "forward":
            forward_batch.run(model, pool, *plan[1:])
        elif kind == "logits":
            ids = plan[1].to(device)
            model(ids, torch.arange(len(ids), device=device), SequenceKV())
        elif kind == "pool":
            pool = None  # the old one's memory first
            pool = KVPool(model.rank_config, plan[1], plan[2], device)
        elif kind == "stop":
            return


def start(tp: int | None, config, device: str, load_args: dict) -> tuple[TensorParallel | None, list, str]:
    """Form (or, under torchrun, join) the group LLM.load(tp=...) asks for: (this rank, followers started
    here, this rank's device). (None, [], device) for one rank. Every rank checks the split before joining,
    so a bad --tp fails the same way everywhere instead of leaving a rank waiting."""
    if launched_by_torchrun():
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if tp not in (None, size):
            raise MinillmError(f"--tp {tp} disagrees with torchrun's {size} processes; drop --tp under torchrun")
        parallel = TensorParallel(config, rank, size)
        if torch.device(device).type == "cuda":
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            torch.cuda.set_device(device)
        join(rank, size, device)
        return parallel, [], device
    if tp is None or tp == 1:
        return None, [], device
    parallel = TensorParallel(config, 0, tp)
    if torch.device(device).type != "cpu":
        raise MinillmError(
            f"LLM.load(tp=...) starts its ranks on this machine's CPU; on {device}, launch with torchrun"
        )
    threads = max(1, torch.get_num_threads() // tp)  # the process's threads, shared out among the ranks
    followers, master = _spawn_followers(tp, load_args, threads)
    torch.set_num_threads(threads)
    try:
        join(0, tp, device, master)
    except BaseException:
        abandon(followers)
        raise
    return parallel, followers, device


def abandon(followers: list[subprocess.Popen]) -> None:
    """After a failed start: stop the followers started here and leave the group."""
    for p in followers:
        p.kill()
        p.wait()
    if dist.is_initialized():
        dist.destroy_process_group()


def follow_and_exit(model: CausalLM, device: str) -> None:
    """A follower's whole remaining life: follow rank 0, then end the process (status 0 when rank 0 said
    stop, 1 with one line when a rank failed)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every rank; rank 0 decides when to stop
    try:
        follow(model, device)
    except RankFailure as e:
        print(f"minillm: error: rank {model.tp.rank}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    dist.destroy_process_group()
    raise SystemExit(0)


def _spawn_followers(size: int, load_args: dict, threads: int) -> tuple[list[subprocess.Popen], tuple[str, int]]:
    """Start ranks 1..size-1 on this machine, each to load load_args and follow."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        master = ("127.0.0.1", s.getsockname()[1])
    followers = []
    for rank in range(1, size):
        message = json.dumps({"rank": rank, "size": size, "master": master, "threads": threads, "load": load_args})
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(name, None)
        code = f"from minillm.ranks import follower_main; follower_main({message!r})"
        followers.append(subprocess.Popen([sys.executable, "-c", code], env=env))
    return followers, master


def follower_main(message: str) -> None:
    """Entry point of a follower started by _spawn_followers."""
    from pathlib import Path

    from .loading.loader import load_model
    from .model.config import DTYPES, load_config

    spec = json.loads(message)
    torch.set_num_threads(spec["threads"])
    rank, size, load = spec["rank"], spec["size"], spec["load"]
    folder = Path(load["folder"])
    try:
        join(rank, size, load["device"], tuple(spec["master"]))
        config = load_config(folder)
        dtype = DTYPES[load["dtype"]] if load["dtype"] else None
        model = load_model(
            folder,
            config,
            dtype,
            load["device"],
            load["prepack"],
            load["quantize"],
            load["group_size"],
            TensorParallel(config, rank, size),
            load["exact"],
        )
        wait_until_every_rank_loaded()
    except MinillmError as e:
        print(f"minillm: error: rank {rank}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    follow_and_exit(model, load["device"])
