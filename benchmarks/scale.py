"""Scale: peak memory and time per round of a speaker partition with thousands of clients.

For each size N (default 100, 1,000 and 2,618, the training speakers of
Speech Commands v0.02) a synthetic dataset with N training speakers
(``conf/dataset/synthetic_speakers.yaml``: ten command words and one other
word per speaker, 10 + 10 held-out speakers) is generated and cached first,
outside the measurement. Then the real ``fedkws-train`` runs as a child
process: ``partition=speaker`` with one speaker per client (N clients of about
11 examples each), 10 clients sampled per round, the small CNN (channels
8, 16; BatchNorm), one local epoch, eval mode only, Flower simulation on Ray
with the default two actors and fedkws's default SuperNodes
(``federation.supernodes=auto``: one per client up to 100 clients, 100 beyond;
``--scale-supernodes K`` for another number): one per client at 100 clients,
100 each serving many at the larger sizes. For comparison, in each pass the largest
size runs once more with one SuperNode per client (``federation.supernodes=null``),
reported beside the targets.

Memory: every 0.5 s the benchmark reads ``/proc`` for every process of the
run (the child's session: the fedkws-train driver, Ray's GCS, raylet, agents
and the ClientApp actors; all inherit it) and sums their resident set sizes
(VmRSS). The peak of that sum is the "peak RSS" of the run. Summing RSS counts
pages shared between processes (the torch libraries each process maps, the
memory-mapped dataset) once per process, so it is an upper bound; the sum of
proportional set sizes (PSS, shared pages split between their users) at the
same moment is given beside it. PSS is read (``smaps_rollup``, which walks
every page table: about 0.1 s for a run's ten processes, a fifth of a core at
every sample) only when the RSS sum reaches a new high, the only readings a
peak can be.

Time per round: ``results.json``'s per-round ``seconds`` (training of the
sampled clients, aggregation, validation), the mean over rounds 2.. (round 1
also pays the actors' first data loads), 48 rounds by default. A round takes a
few tenths of a second. Round times used to come in steps of about 0.05 s (the
server polled for replies every 0.05 s, Flower's engine handed messages out
every 0.1 s; neither waits a fixed time now, see ``fedkws.fl.prompt_engine``), so a
median jumped a whole step between runs of the same configuration. The ratio is
the mean of many rounds; the median is given beside it. The phases before round 1 and after the last
round are timed from when the run's console lines arrive.

This machine's speed drifts from one process to the next (and the memory sampler
used to take CPU from the run it measured, see above): a single run per size put
the round time of 2,618 against 100 clients anywhere from -6 % to +13 % in
successive runs. The
sizes therefore run in turn, ``--scale-repeats`` times (default 2): a size's round
time is that of its fastest run, its memory the largest peak of its runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import common
from common import Ratio

TITLE = "speaker partition at 100, 1,000 and 2,618 clients (peak RSS, time per round)"
NOTES = ""  # filled by run(): the per-size table and where the time before round 1 goes
SIZES = (100, 1000, 2618)
HELD_OUT = 10  # speakers per held-out split
SAMPLED = 10  # clients per round
RSS_LIMIT_GB = 4.0
ROUND_SPREAD = 0.10


def add_arguments(group) -> None:
    """``--scale-clients``, ``--scale-rounds``, ``--scale-repeats``, ``--scale-timeout``, ..."""
    group.add_argument(
        "--scale-clients",
        type=_sizes,
        default=",".join(str(n) for n in SIZES),
        help="comma-separated client counts (default %(default)s); targets use the "
        "smallest and the largest",
    )
    group.add_argument("--scale-rounds", type=common.at_least(1), default=48, help="rounds per run")
    group.add_argument(
        "--scale-repeats",
        type=common.at_least(1),
        default=2,
        help="passes over the sizes, one after the other (default %(default)s): each size's "
        "fastest run gives its round time, its largest peak its memory",
    )
    group.add_argument(
        "--scale-supernodes",
        type=common.at_least(0),
        default=None,
        help="federation.supernodes of the measured runs (default: the config's, auto; "
        "0: one per client, and no comparison run)",
    )
    group.add_argument(
        "--scale-timeout",
        type=common.positive_seconds,
        default=3600.0,
        help="seconds before a run is stopped",
    )
    group.add_argument(
        "--scale-profile",
        action="store_true",
        help="run the largest size once more under cProfile (every thread of the driver; "
        "benchmarks/thread_profile.py) and summarise where its time went",
    )


def dataset_overrides(clients: int) -> list[str]:
    """The config of a dataset with ``clients`` training speakers, one client each."""
    return [
        "dataset=synthetic_speakers",
        f"dataset.generate.speakers={clients + 2 * HELD_OUT}",
        f"dataset.generate.held_out_speakers={HELD_OUT}",
        "partition=speaker",
        "partition.speakers_per_client=1",
    ]


def run_overrides(
    clients: int, rounds: int, run_dir: Path, supernodes: int | str | None
) -> list[str]:
    """Everything ``fedkws-train`` gets for one size (``supernodes`` None: one per client)."""
    return [
        *dataset_overrides(clients),
        f"federation.supernodes={'null' if supernodes is None else supernodes}",
        # fraction 1e-6 rounds to 0 clients: min_train_clients decides, 10 per round
        "strategy.fraction_train=1e-6",
        f"strategy.min_train_clients={SAMPLED}",
        "model=cnn",
        "model.channels=[8,16]",
        "bn.eval_modes=[eval]",
        f"train.rounds={rounds}",
        "train.local_epochs=1",
        "logger=disabled",
        "progress=true",  # the round lines: when each round ends
        "name=bench_scale",
        f"hydra.run.dir={run_dir}",
    ]


def prepare(clients: int) -> None:
    """Generate and cache the dataset of one size (not measured)."""
    from fedkws.recipes.common import load_data

    spec = common.run_spec(dataset_overrides(clients) + ["logger=disabled", "progress=false"])
    root = spec.dataset.data.root
    common.progress("scale", f"N={clients}: dataset {root} (generated if missing)")
    load_data(spec)


# ---------------------------------------------------------------------------- /proc sampling

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: str) -> tuple[int, int, str, int] | None:
    """``(ppid, session, comm, start time)`` of a live process; None if gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    close = text.rfind(")")
    fields = text[close + 2 :].split()
    if fields[0] in ("Z", "X"):  # exited, waiting to be reaped: nothing left to end or measure
        return None
    return int(fields[1]), int(fields[3]), text[text.find("(") + 1 : close], int(fields[19])


def _proc_kb(pid: int, name: str, keys: tuple[str, ...]) -> dict[str, int]:
    """Fields ``keys`` of ``/proc/<pid>/<name>`` in bytes (none for a process that is gone)."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in keys:
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return values


def _memory(pid: int) -> tuple[int, int]:
    """``(rss, anonymous rss)`` of a process in bytes (zeros for one that is gone)."""
    values = _proc_kb(pid, "status", ("VmRSS", "RssAnon"))
    return values.get("VmRSS", 0), values.get("RssAnon", 0)


def _pss(pid: int) -> int:
    """Proportional set size of a process in bytes (0 for one that is gone)."""
    return _proc_kb(pid, "smaps_rollup", ("Pss",)).get("Pss", 0)


def processes_of(root: int) -> dict[int, tuple[str, int]]:
    """Every process in ``root``'s session or below it: ``{pid: (comm, start time)}``."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (st := _stat(entry.name)) is not None:
            table[int(entry.name)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in table and pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    found |= {pid for pid, (_, sid, _, _) in table.items() if sid == root}
    return {pid: (table[pid][2], table[pid][3]) for pid in found}


def _role(comm: str, pid: int, root: int) -> str:
    if pid == root:
        return "driver (fedkws-train)"
    if comm.startswith("ray::ClientApp"):
        return "ClientApp actors"
    return "Ray services"


@dataclass(frozen=True)
class Reading:
    """Memory of every process of a run at one moment, in bytes, summed over the processes."""

    t: float
    rss: int
    pss: int  # proportional set size (shared pages split between their users); 0: not read
    anon: int  # RssAnon: private memory, without file pages (libraries, memory-mapped data)
    roles: dict[str, int]  # rss by role: driver, Ray services, ClientApp actors
    largest: int  # rss of the largest process


@dataclass
class MemoryTrace:
    """Readings of a process tree's memory, taken from another thread."""

    root: int
    interval: float = 0.5
    readings: list[Reading] = field(default_factory=list)
    seen: dict[int, tuple[str, int]] = field(default_factory=dict)

    def sample(self) -> None:
        """One reading of every process of the tree."""
        procs = processes_of(self.root)
        self.seen.update(procs)
        rss = anon = largest = 0
        roles: dict[str, int] = {}
        for pid, (comm, _) in procs.items():
            r, a = _memory(pid)
            rss, anon, largest = rss + r, anon + a, max(largest, r)
            role = _role(comm, pid, self.root)
            roles[role] = roles.get(role, 0) + r
        high = rss >= max((r.rss for r in self.readings), default=0)  # a peak can only be one
        pss = sum(_pss(pid) for pid in procs) if high else 0
        self.readings.append(Reading(time.monotonic(), rss, pss, anon, roles, largest))

    def follow(self, stop: threading.Event) -> None:
        """Sample until ``stop`` is set."""
        while not stop.is_set():
            self.sample()
            stop.wait(self.interval)

    def peak(self, until: float = float("inf")) -> Reading:
        """The reading with the largest summed RSS (of those taken before ``until``)."""
        return max((r for r in self.readings if r.t <= until), key=lambda r: r.rss)


def _alive(pid: int, start: int) -> bool:
    """Whether ``pid`` is still the process that started at ``start`` (ids get reused)."""
    st = _stat(str(pid))
    return st is not None and st[3] == start


def end_leftovers(seen: dict[int, tuple[str, int]]) -> list[int]:
    """Terminate the processes of a finished run that are still alive; those that stay."""
    alive = [pid for pid, (_, start) in seen.items() if _alive(pid, start)]
    deadline = time.monotonic() + 10  # Ray's processes end on their own shortly after the driver
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [p for p in alive if _alive(p, seen[p][1])]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not alive:
            break
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p, seen[p][1]) for p in alive):
            time.sleep(0.2)
        alive = [p for p in alive if _alive(p, seen[p][1])]
    return alive


# ---------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    """What one size measured."""

    clients: int
    supernodes: int  # SuperNodes of the simulation
    setting: str  # federation.supernodes that gave them
    wall_s: float
    peak: Reading  # the largest summed RSS of the whole run
    peak_rounds: Reading  # the largest up to the last round (before the final evaluation)
    round_s: list[float]
    train_s: list[float]
    setup_s: float  # start -> the "data:" line (imports, Hydra, data, partition)
    to_round1_s: float  # "data:" line -> round 1 starts (plot, Ray, actors, discovery)
    after_rounds_s: float  # last round line -> exit (final evaluation, files)

    @property
    def steady_round_s(self) -> float:
        """Mean seconds of rounds 2.. (round 1 if there is only one)."""
        return statistics.fmean(self.round_s[1:] or self.round_s)

    @property
    def median_round_s(self) -> float:
        """Median seconds of rounds 2.. (round 1 if there is only one)."""
        return statistics.median(self.round_s[1:] or self.round_s)


def _read_lines(stream, lines: list[tuple[float, str]], clients: int) -> None:
    for raw in stream:
        line = raw.rstrip()
        lines.append((time.monotonic(), line))
        if line.startswith(("data:", "round", "error", "validation", "test accuracy")):
            common.progress("scale", f"N={clients}: {line}")


def _when(lines, prefix: str) -> float | None:
    return next((t for t, line in lines if line.lstrip().startswith(prefix)), None)


def _launch(
    clients: int, rounds: int, run_dir: Path, profile: Path | None, supernodes: int | str | None
) -> subprocess.Popen:
    # RAY_ADDRESS=local: a Ray of its own, never one that `ray start` left running here.
    env = dict(
        os.environ,
        FLWR_TELEMETRY_ENABLED="0",
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
        COLUMNS="200",
        RAY_ADDRESS="local",
    )
    command = [str(common.VENV_BIN / "fedkws-train")]
    if profile is not None:
        script = Path(__file__).with_name("thread_profile.py")
        command = [str(common.VENV_BIN / "python"), str(script), str(profile), "fedkws.train:main"]
    return subprocess.Popen(
        [*command, *run_overrides(clients, rounds, run_dir, supernodes)],
        cwd=common.ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def measure(
    clients: int,
    rounds: int,
    timeout: float,
    out: Path,
    supernodes: int | str | None,
    profile: Path | None = None,
) -> RunResult:
    """One ``fedkws-train`` run of ``clients`` clients, with its memory trace.

    ``supernodes``: ``federation.supernodes`` (None: one per client). With
    ``profile``, the same run under ``thread_profile.py``, which writes there.
    """
    from fedkws.fl.server_app import node_count

    nodes = node_count(clients, supernodes)
    run_dir = out / f"clients{clients}-nodes{nodes}{'-profiled' if profile else ''}"
    start = time.monotonic()
    proc = _launch(clients, rounds, run_dir, profile, supernodes)
    trace, stop, lines = MemoryTrace(proc.pid), threading.Event(), []
    sampler = threading.Thread(target=trace.follow, args=(stop,), daemon=True)
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines, clients), daemon=True)
    sampler.start()
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        common.progress("scale", f"N={clients}: over {timeout:.0f} s, stopping it")
    finally:
        stop.set()
        sampler.join()
        end = time.monotonic()
        left = end_leftovers(trace.seen)
        reader.join(timeout=10)
    if left:
        raise common.BenchmarkError(f"N={clients}: processes {left} of the run would not end")
    if proc.returncode != 0:
        tail = "\n".join(line for _, line in lines[-15:])
        raise common.BenchmarkError(
            f"N={clients}: fedkws-train exited with {proc.returncode}:\n{tail}"
        )
    setting = "null" if supernodes is None else str(supernodes)
    return _result(clients, nodes, setting, run_dir, trace, lines, start, end)


def _result(clients, nodes, setting, run_dir, trace, lines, start, end) -> RunResult:
    records = json.loads((run_dir / "results.json").read_text())["rounds"]
    round_s = [float(r["seconds"]) for r in records]
    t_data, t_first = _when(lines, "data:"), _when(lines, "round")
    t_last = max(t for t, line in lines if line.startswith("round"))
    return RunResult(
        clients=clients,
        supernodes=nodes,
        setting=setting,
        wall_s=end - start,
        peak=trace.peak(),
        peak_rounds=trace.peak(until=t_last),
        round_s=round_s,
        train_s=[float(r["metrics"]["time/train_s"]) for r in records],
        setup_s=t_data - start,
        to_round1_s=(t_first - round_s[0]) - t_data,
        after_rounds_s=end - t_last,
    )


# ---------------------------------------------------------------------------- the message pump


def _link_state(nodes: int):
    """Flower's in-memory link state and grid with ``nodes`` SuperNodes, as a simulation has."""
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    # The steps of flwr.simulation.run_simulation._main_loop and vce_api.start_vce.
    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    state = factory.state()
    state.run_ids[run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run_id)
    nodes_mapping = _register_nodes(nodes, factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, list(nodes_mapping)


def pump_pass_seconds(nodes: int, in_flight: int, fedkws: bool = False) -> float:
    """One look of the simulation's message pump with ``in_flight`` messages stored.

    Flower's (``vce_api.add_messages_to_queue``) calls ``state.get_message_ins(node_id,
    limit=1)`` for every node, every 0.1 s, for the whole simulation, and each call
    checks every stored message. fedkws's (``fedkws.fl.prompt_engine._look``, ``fedkws``
    true) reads the state's store once and hands out each waiting node's first message.
    """
    import queue

    from flwr.app import Message, RecordDict

    from fedkws.fl.prompt_engine import _look

    state, grid, node_ids = _link_state(nodes)
    messages = [Message(RecordDict(), node_ids[i % nodes], "query.hello") for i in range(in_flight)]
    list(grid.push_messages(messages))
    mapping, out = {node: i for i, node in enumerate(node_ids)}, queue.Queue()
    start = time.perf_counter()
    if fedkws:
        _look(state, mapping, out)
    else:
        for node in node_ids:
            state.get_message_ins(node_id=node, limit=1)
    return time.perf_counter() - start


def _pump_table(sizes: list[int]) -> str:
    lines = [
        "One look of the simulation's message pump, measured on Flower's in-memory link "
        "state with the run's number of nodes. Flower's engine (`vce_api."
        "add_messages_to_queue`) asks every node with `get_message_ins`, every 0.1 s; "
        "fedkws's (`fedkws.fl.prompt_engine`) reads the state's store once and hands out each "
        "waiting node's first message, after every push and after each look that found "
        "messages, and every 0.1 s:",
        "",
        "| nodes | 0 messages stored (between rounds): Flower / fedkws "
        "| 10 (a round's training) | one per node (discovery; every recalibration query) |",
        "|---|---|---|---|",
    ]
    for n in sizes:
        common.progress("scale", f"message pump with {n} nodes")
        cells = []
        for stored in (0, SAMPLED, n):
            flower, ours = (1000 * pump_pass_seconds(n, stored, f) for f in (False, True))
            cells.append(f"{flower:,.1f} / {ours:,.1f} ms")
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- report


# Threads of the driver, as thread_profile.py groups them, and what each one is.
_THREADS = {
    "server_th_with_start_checks": "ServerApp thread (fedkws's round loop)",
    "add_messages_to_queue": "Flower's message pump (simulation engine)",
    "put_message_into_state": "Flower's reply pump (simulation engine)",
    "ThreadPoolExecutor": "Flower's workers (waiting on Ray actors)",
}
_SKIP = ("threading.py", "concurrent/futures", "queue.py", "run_simulation.py", "server_app.py:1")


def _profile_summary(path: Path, clients: int, top: int = 10) -> str:
    """The largest cumulative times of fedkws and Flower functions, per driver thread."""
    profile = json.loads(path.read_text())
    lines = [
        f"cProfile of the driver at {clients:,} clients (a separate run: cProfile slows "
        "Python code several times, so compare its rows with each other, not with the "
        "timings above). Per thread, the fedkws and Flower functions with the largest "
        "cumulative wall seconds (waiting included), their own seconds and calls:",
        "",
    ]
    for group, label in _THREADS.items():
        rows = [
            r
            for r in profile.get(group, [])
            if ("fedkws/" in r[0] or "flwr/" in r[0]) and not any(k in r[0] for k in _SKIP)
        ]
        if not rows:
            continue
        total = rows[0][3]
        # Below the thread's entry point, wrappers that only pass the whole time through.
        rows = rows[:1] + [r for r in rows[1:] if r[3] < 0.98 * total or r[2] > 0.05 * r[3]]
        rows = rows[:top]
        lines.append(f"- {label}:")
        for name, calls, own, cumulative in rows:
            short = name.split("site-packages/")[-1].split("src/")[-1]
            lines.append(f"  - `{short}` {cumulative:,.1f} s, own {own:,.1f} s, {calls:,} calls")
    return "\n".join(lines)


def _gb(n: int) -> float:
    return n / 1024**3


def _time_table(results: list[RunResult], per_pass: int) -> str:
    lines = [
        "| pass | clients | SuperNodes | wall s | start -> `data:` line s "
        "| `data:` line -> round 1 s | round 1 s | rounds 2.. mean s | median s (each) "
        "| last round -> exit s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(results):
        each = ", ".join(f"{s:.2f}" for s in r.round_s[1:])
        lines.append(
            f"| {i // per_pass + 1} | {r.clients:,} | {r.supernodes:,} | {r.wall_s:.1f} "
            f"| {r.setup_s:.1f} | {r.to_round1_s:.1f} "
            f"| {r.round_s[0]:.2f} | {r.steady_round_s:.3f} | {r.median_round_s:.2f} ({each}) "
            f"| {r.after_rounds_s:.1f} |"
        )
    return "\n".join(lines)


def _memory_table(results: list[RunResult], per_pass: int) -> str:
    lines = [
        "| pass | clients | SuperNodes | when | RSS sum GB (driver / Ray services / actors) "
        "| PSS sum GB | anonymous GB | largest process GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    roles = ("driver (fedkws-train)", "Ray services", "ClientApp actors")
    for i, r in enumerate(results):
        for when, peak in (("whole run", r.peak), ("until the last round", r.peak_rounds)):
            split = " / ".join(f"{_gb(peak.roles.get(k, 0)):.2f}" for k in roles)
            lines.append(
                f"| {i // per_pass + 1} | {r.clients:,} | {r.supernodes:,} | {when} "
                f"| {_gb(peak.rss):.2f} ({split}) | {_gb(peak.pss):.2f} "
                f"| {_gb(peak.anon):.2f} | {_gb(peak.largest):.2f} |"
            )
    return "\n".join(lines)


def _fastest(runs: list[RunResult]) -> RunResult:
    """The run of one configuration with the shortest rounds (see the module's docstring)."""
    return min(runs, key=lambda r: r.steady_round_s)


def _largest(runs: list[RunResult]) -> RunResult:
    """The run of one configuration with the largest peak of summed RSS."""
    return max(runs, key=lambda r: r.peak.rss)


def _ratios(
    small: list[RunResult], big: list[RunResult], per_client: list[RunResult]
) -> list[Ratio]:
    """The targets from each configuration's runs; ``per_client``: the comparison's, if any."""
    rss_run, small_rss = _largest(big), _largest(small)
    rss = _gb(rss_run.peak.rss)
    ratios = [
        Ratio(
            f"peak_rss_{rss_run.clients}_clients",
            rss,
            f"<= {RSS_LIMIT_GB:g} GB",
            rss <= RSS_LIMIT_GB,
            f"peak of the summed VmRSS of every process of the run (driver, Ray services, "
            f"ClientApp actors), sampled every 0.5 s, the largest of {len(big)} runs; at "
            f"that moment PSS {_gb(rss_run.peak.pss):.2f} GB, anonymous "
            f"{_gb(rss_run.peak.anon):.2f} GB; until the last round "
            f"{_gb(rss_run.peak_rounds.rss):.2f} GB; {small_rss.clients} clients: "
            f"{_gb(small_rss.peak.rss):.2f} GB",
            unit="GB",
        ),
        _round_time(small, big),
    ]
    if per_client:
        ratios.append(_round_time(small, per_client))
    return ratios


def _round_time(small_runs: list[RunResult], big_runs: list[RunResult]) -> Ratio:
    small, big = _fastest(small_runs), _fastest(big_runs)
    change = big.steady_round_s / small.steady_round_s - 1
    each = ", ".join(
        f"{'/'.join(f'{r.steady_round_s:.3f}' for r in runs)} s" for runs in (big_runs, small_runs)
    )
    nodes = "one per client" if big.supernodes == big.clients else f"{big.supernodes:,}"
    nodes += f" (federation.supernodes={big.setting})"
    return Ratio(
        f"round_time_{big.clients}_vs_{small.clients}_clients, SuperNodes: {nodes}",
        100 * change,
        f"within +-{100 * ROUND_SPREAD:g} %",
        abs(change) <= ROUND_SPREAD,
        f"mean seconds per round over rounds 2..{len(big.round_s)} (results.json), the "
        f"fastest of each size's runs: {big.steady_round_s:.3f} s at {big.clients:,} clients "
        f"on {big.supernodes:,} SuperNodes vs {small.steady_round_s:.3f} s at "
        f"{small.clients:,} on {small.supernodes:,} (every run: {each}); {SAMPLED} clients "
        f"sampled per round; that run: whole run {big.wall_s:.0f} s, peak RSS "
        f"{_gb(big.peak.rss):.2f} GB",
        unit="%",
    )


def run(args) -> list[Ratio]:
    """Prepare every size's dataset, then run the sizes one at a time, smallest first."""
    global NOTES
    sizes = args.scale_clients
    for n in sizes:
        prepare(n)
    from fedkws.fl.server_app import node_count

    supernodes = "auto" if args.scale_supernodes is None else args.scale_supernodes or None
    runs: list[tuple[int, int | str | None]] = [(n, supernodes) for n in sizes]
    if node_count(sizes[-1], supernodes) < sizes[-1]:
        runs.append((sizes[-1], None))  # for comparison: one SuperNode per client
    results: list[RunResult] = []
    by_run: dict[tuple[int, int | str | None], list[RunResult]] = {key: [] for key in runs}
    with tempfile.TemporaryDirectory(prefix="fedkws-bench-scale-") as tmp:
        for repeat in range(args.scale_repeats):
            for n, nodes in runs:
                common.progress("scale", f"N={n}: fedkws-train, {args.scale_rounds} rounds, "
                                f"federation.supernodes={nodes}, pass {repeat + 1}")  # fmt: skip
                out = Path(tmp) / f"pass{repeat + 1}"
                results.append(measure(n, args.scale_rounds, args.scale_timeout, out, nodes))
                by_run[(n, nodes)].append(r := results[-1])
                common.progress("scale", f"N={n}: {r.wall_s:.0f} s, peak RSS "
                                f"{_gb(r.peak.rss):.2f} GB")  # fmt: skip
        notes = [
            f"Time per run, {args.scale_repeats} passes over the sizes in turn (wall seconds; "
            "phases from when the run's console lines arrived):",
            "",
            _time_table(results, len(runs)),
            "",
            "Memory per run (sums over the run's processes at the moment of the largest RSS sum):",
            "",
            _memory_table(results, len(runs)),
            "",
            _pump_table(sizes),
        ]
        if args.scale_profile:
            common.progress("scale", f"N={sizes[-1]}: once more under cProfile")
            out = Path(tmp) / "profile.json"
            measure(sizes[-1], args.scale_rounds, args.scale_timeout, Path(tmp), supernodes,
                    profile=out)  # fmt: skip
            notes += ["", _profile_summary(out, sizes[-1])]
    NOTES = "\n".join(notes)
    per_client = by_run[runs[-1]] if len(runs) > len(sizes) else []
    return _ratios(by_run[runs[0]], by_run[runs[len(sizes) - 1]], per_client)


def _sizes(text: str) -> list[int]:
    """``--scale-clients``: two or more client counts, each at least the clients per round."""
    try:
        sizes = sorted({int(n) for n in text.split(",") if n.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if len(sizes) < 2 or sizes[0] < SAMPLED:
        raise argparse.ArgumentTypeError(f"needs two sizes or more, each >= {SAMPLED}: {text!r}")
    return sizes


if __name__ == "__main__":
    raise SystemExit(common.main_for(__file__))
