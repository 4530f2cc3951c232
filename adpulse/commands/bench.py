"""``adpulse bench features|decisions|serve|state|mixed|promises|rebalance|scorer|broker|
startup|eos|catalog-join|adtext|all|table``: benchmarks and reproductions, each with its
same-run baseline, declared as rows; what each runs is in :mod:`adpulse.commands.benchrun`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adpulse.commands import Handler, Subparsers, add_bootstrap, add_command, add_group
from adpulse.commands.benchrun import (
    cmd_bench_adtext,
    cmd_bench_all,
    cmd_bench_broker,
    cmd_bench_catalog_join,
    cmd_bench_decisions,
    cmd_bench_eos,
    cmd_bench_features,
    cmd_bench_gaps,
    cmd_bench_mixed,
    cmd_bench_promises,
    cmd_bench_rebalance,
    cmd_bench_scorer,
    cmd_bench_secondary,
    cmd_bench_seq_scorer,
    cmd_bench_serve,
    cmd_bench_startup,
    cmd_bench_state,
    cmd_bench_table,
    with_bench_limits,
)


@dataclass(frozen=True)
class Bench:
    """One ``adpulse bench NAME`` subcommand as data: its words, its sizes and its flags."""

    name: str
    handler: Handler
    help: str
    description: str
    sizes: dict[str, tuple[int | float, str]] = field(default_factory=dict)
    # ``--NAME`` per key, in order; the default's type is the flag's (3: int, 10.0: float)
    flags: tuple[tuple[str, dict[str, Any]], ...] = ()  # more arguments: (flag, add_argument's)
    json_help: str = ""  # default: 'also write {"NAME": figures} as JSON'
    bootstrap: bool = True  # takes --bootstrap (it runs on the broker that names)


DATA = ("--data", {"default": "../shared/data", "help": "folder with the Taobao sample to fit"})
BROKERS = ("--brokers",
           {"default": "kafka,tansu", "help": "comma list of kafka, tansu (kafka,tansu)"})
FIGURES = "also write the figures as JSON"
SWAP = ("--swap", {"action": "store_true",
                   "help": "publish a new model version halfway through the first /decide phase "
                   "and report the latency of the requests around the hot swap"})

ROUTE = ("--route", {"choices": ["any", "owner"], "default": "any",
                     "help": "with --workers: any sends requests round robin (a non-owner "
                     "forwards), owner sends each to its user's owner by GET /owners (any)"})

BENCHES = (
    Bench(
        "features",
        with_bench_limits(cmd_bench_features),
        help="interest-feature throughput and freshness of one worker",
        description="Produce N Taobao-shaped events, then measure a worker's events/s against "
        "a bare aiokafka consume->produce loop over the same messages, and event-to-state "
        "freshness at a fixed offered load.",
        sizes={
            "events": (200_000, "events per repeat (200000)"),
            "repeat": (3, "repeats; the median is reported (3)"),
            "rate": (5000.0, "offered events/s for freshness"),
            "duration": (10.0, "seconds of freshness load (10)"),
            "users": (10_000, "distinct users (10000)"),
        },
        flags=(DATA,),
        json_help=FIGURES,
    ),
    Bench(
        "serve",
        with_bench_limits(cmd_bench_serve),
        help="POST /decide latency under open-loop Poisson load, alone and with ingest",
        description="Warm interest vectors for --users users, then offer POST /decide "
        "requests (Poisson arrivals at --rate/s, --candidates ads each, keep-alive pool) to "
        "one worker: latency from each request's scheduled send time, p50/p99/p99.9, errors, "
        "sheds and no-fills; alone, then with --event-rate user-events/s of ingest and "
        "freshness probes (event produced -> visible to /decide). Baselines from the same "
        "run: GET /health at the same rate (the HTTP floor) and the in-process decision "
        "cost. --duration 120 or more also reports p99 per minute.",
        sizes={
            "rate": (1000.0, "offered requests/s (1000)"),
            "duration": (20.0, "seconds per phase (20)"),
            "event_rate": (5000.0, "user-events/s of concurrent ingest in the second phase (5000)"),
            "users": (10_000, "users with warm vectors (10000)"),
            "candidates": (100, "candidate ads per request (100)"),
            "ads": (2000, "ads in the catalog (2000)"),
            "workers": (1, "workers in one group sharing the requests (1)"),
        },
        flags=(SWAP, ROUTE),
    ),
    Bench(
        "decisions",
        with_bench_limits(cmd_bench_decisions),
        help="end-to-end decision latency under Poisson-arriving ad requests",
        description="Warm interest vectors for --users users, then offer ad requests "
        "(Poisson arrivals at --rate/s, --candidates ads each) to one worker and measure "
        "request produced -> decision consumed latency p50/p99/p99.9 and throughput.",
        sizes={
            "rate": (1000.0, "offered requests/s (1000)"),
            "duration": (20.0, "seconds per repeat (20)"),
            "repeat": (3, "repeats; medians reported (3)"),
            "users": (10_000, "users with warm vectors (10000)"),
            "candidates": (100, "candidate ads per request (100)"),
            "ads": (2000, "ads in the catalog (2000)"),
        },
        json_help=FIGURES,
    ),
    Bench(
        "scorer",
        with_bench_limits(cmd_bench_scorer),
        help="candidate rows/s of the ONNX scorer by batch size, against numpy",
        description="Score batches of 1 to 4096 candidate rows with the newest model version "
        "in ONNX Runtime and, in the same run, with a plain numpy forward pass of the same "
        "graph; then the whole scoring path (feature assembly, micro-batching, ONNX Runtime, "
        "ranking) at 100 candidates per request. Prints a table and a one-line summary. "
        "--device cuda on a machine without a GPU runs on CPU and says so.",
        flags=(("--device", {
            "choices": ["cpu", "cuda", "auto"], "default": "cpu",
            "help": "where ONNX Runtime runs (default cpu; auto: CUDA if present)",
        }),),
        bootstrap=False,
    ),
    Bench(
        "secondary",
        cmd_bench_secondary,
        help="freshness and CPU of a RocksDB secondary instance catching up with a writer",
        description="A spawned primary writes --rate keys/s in write batches of --batch "
        "keys (ingest's shape, the worker's RocksDB options); this process reads the same "
        "database as a RocksDB secondary, catching up every --intervals ms, for --duration "
        "seconds per interval. Print, per interval, when a batch became visible to the "
        "secondary after its write returned (p50/p99), the catch-up call's time and CPU, "
        "the secondary's share of a core, and the primary's write cost per key (the "
        "baseline): what a serving process apart from the worker would pay "
        "(docs/decide.md).",
        sizes={
            "rate": (10_000, "keys written a second (10000)"),
            "batch": (56, "keys a write batch (56)"),
            "duration": (10.0, "seconds per interval (10)"),
        },
        flags=(("--intervals", {"default": "1,5,20",
                                "help": "catch-up intervals, ms, comma-separated (1,5,20)"}),),
        json_help=FIGURES,
        bootstrap=False,
    ),
    Bench(
        "gaps",
        with_bench_limits(cmd_bench_gaps),
        help="CPU of one decision call back to back and with gaps between calls",
        description="Run the worker's decision call in this process (one request of "
        "--candidates ads, in-memory copies of its tables) --calls times per gap, each "
        "after sleeping the gap (--spin: busy-waiting it), in --rounds rounds that go "
        "through every gap in turn; print the median CPU (thread time) per call at each "
        "gap and its ratio to the first gap's. On the 2-core box calls a few "
        "milliseconds apart cost about twice a tight loop's (docs/decide.md).",
        sizes={
            "calls": (400, "timed calls per gap per round (400)"),
            "rounds": (3, "rounds through the gaps; medians reported (3)"),
            "candidates": (100, "candidate ads per request (100)"),
        },
        flags=(
            ("--gaps", {"default": "0,0.2,1,2,4",
                        "help": "gaps between calls, ms, comma-separated (0,0.2,1,2,4)"}),
            ("--spin", {"action": "store_true", "help": "busy-wait the gaps instead of sleeping"}),
        ),
        json_help=FIGURES,
        bootstrap=False,
    ),
    Bench(
        "seq-scorer",
        with_bench_limits(cmd_bench_seq_scorer),
        help="rows/s of the scorer without and with target attention (old and new graph)",
        description="Export three CTR nets: without the attention block, with it over --length "
        "behaviours in its general form only (the graph served before the shared-sequence "
        "branch), and with it as exported today (needs PyTorch); measure all three in one run, "
        "interleaved: the ONNX Runtime session's rows/s at batch 100 with one shared sequence "
        "(a request) and at 100 and 8192 with a sequence per row, every sequence full, CPU ms "
        "per 100-candidate request, and the worker's decision call on 100-candidate requests, "
        "1 and 8 a call.",
        sizes={
            "length": (50, "behaviours per user the block attends over (50)"),
            "seconds": (1.0, "seconds per measured point (1.0)"),
            "repeats": (3, "interleaved repeats; medians are reported (3)"),
        },
        flags=(("--device", {
            "choices": ["cpu", "cuda", "auto"], "default": "cpu",
            "help": "where ONNX Runtime runs (default cpu; auto: CUDA if present)",
        }),),
        bootstrap=False,
    ),
    Bench(
        "state",
        with_bench_limits(cmd_bench_state),
        help="interest state size per user on disk, worker RSS, restore time from the changelog",
        description="Grow the interest table to --users users, then report bytes per user on "
        "disk (against the raw record size), the worker's RSS, and how long a fresh worker "
        "with an empty data directory takes to restore the table from its changelog (against "
        "a bare aiokafka read of the same changelog).",
        sizes={
            "users": (1_000_000, "users in the table (1000000)"),
            "realistic_users": (50_000, "users of the realistic table (50000)"),
            "events_per_user": (20, "events per realistic user (20)"),
            "restore_repeats": (3, "restores timed; median with min-max (3)"),
        },
    ),
    Bench(
        "mixed",
        with_bench_limits(cmd_bench_mixed),
        help="user events, ad requests and clicks offered together to one worker",
        description="Warm interest vectors, then offer --event-rate user events/s and "
        "--request-rate ad requests/s (--candidates ads each) at the same time from two "
        "generator processes, answering --ctr of the decisions with clicks; report decision "
        "latency p50/p99/p99.9, event->state freshness p99, the rates offered and achieved, and "
        "the worker's CPU and RSS.",
        sizes={
            "event_rate": (10_000.0, "offered user events/s (10000)"),
            "request_rate": (1_000.0, "offered ad requests/s (1000)"),
            "duration": (20.0, "seconds per repeat (20)"),
            "repeat": (3, "repeats; medians reported (3)"),
            "users": (10_000, "users with warm vectors (10000)"),
            "candidates": (100, "candidate ads per request (100)"),
            "ctr": (0.02, "share of filled decisions answered with a click (0.02)"),
        },
    ),
    Bench(
        "promises",
        cmd_bench_promises,
        help="timing promises over repeats: catalog -> decisions, label -> other worker, "
        "broker cut -> resume",
        description="On two workers: publish an ad for a new placement and poll /decide on "
        "each until it is chosen (catalog change -> decisions, target 1 s); produce a "
        "ctr-feedback label and poll both workers' learner state until it counts it (label -> "
        "the other worker's next decision, bound 1 s). Then, on a dedicated broker behind a "
        "cuttable TCP proxy, cut one worker's link for --cut-s while events flow and time "
        "from the link's return to events applied again (target 5 s). Medians, spread, p99.",
        sizes={
            "catalog_repeats": (10, "catalog changes timed (10)"),
            "labels": (30, "labels timed (30)"),
            "cuts": (3, "broker cuts timed (3)"),
            "cut_s": (3.0, "seconds each cut lasts (3.0)"),
        },
    ),
    Bench(
        "rebalance",
        with_bench_limits(cmd_bench_rebalance),
        help="two workers split the partitions; one stops; pause in decisions during takeover",
        description="Start two workers on the same topics, check both hold partitions and serve "
        "decisions, then stop one (SIGTERM, then SIGKILL in a second round) while requests keep "
        "arriving at --rate/s; report the longest gap between decisions, what it is made of, and "
        "whether the survivor serves the stopped worker's users with the same interest state.",
        sizes={
            "rate": (200.0, "offered ad requests/s during the rebalance (200)"),
            "users": (2_000, "users with interest state (2000)"),
            "session_timeout": (3.0, "consumer-group session timeout of both workers, s (3)"),
            "repeats": (3, "rounds per signal; medians with min-max reported (3)"),
        },
        flags=(("--no-kill", {"action": "store_true", "help": "skip the SIGKILL round"}),),
    ),
    Bench(
        "broker",
        with_bench_limits(cmd_bench_broker),
        help="bare aiokafka produce->consume echo on each embedded broker: latency, broker CPU",
        description="Start each embedded broker of --brokers in turn (stopping one before the "
        "next), create one 4-partition topic, produce --rate msg/s of --size bytes for --duration "
        "seconds and consume them with one aiokafka consumer (fetch wait 10 ms). Print per "
        "--window seconds: sent, received, broker CPU (% of one core), latency p50/p99; then per "
        "broker the last/first window p99 ratio and whether the consumer starved. The same load "
        "runs on each broker in one process run: only ratios within one run compare.",
        sizes={
            "rate": (2000.0, "offered messages/s (2000)"),
            "duration": (180.0, "seconds of load per broker (180)"),
            "window": (15.0, "seconds per reported window (15)"),
            "size": (200, "payload bytes per message (200)"),
            "linger_ms": (1, "producer linger.ms (1)"),
        },
        flags=(BROKERS,),
        bootstrap=False,
    ),
    Bench(
        "startup",
        with_bench_limits(cmd_bench_startup),
        help="workers started in a row on a broker full of old topics: ready, then catalog?",
        description="Per embedded broker of --brokers: fill it with --fill-sets adpulse topic "
        "sets of --fill-events user-events and 42 ads each (a real worker reads the first "
        "--fill-workers of them), then start --workers fresh workers one after another, each "
        "on new topics with 42 ads. Per worker: seconds to /health 200, then ready -> "
        "adpulse_catalog_ads = 42; not loaded within --stall-s is a stall, kept with its log "
        "tail, the group as the broker describes it and broker/worker CPU.",
        sizes={
            "fill_sets": (30, "topic sets left on the broker before the workers start (30)"),
            "fill_events": (20_000, "user-events per fill set (20000)"),
            "fill_workers": (2, "fill sets a real worker reads first (2)"),
            "workers": (15, "workers started one after another (15)"),
            "stall_s": (30.0, "seconds after ready without the catalog that count as a stall (30)"),
            "ready_timeout_s": (60.0, "seconds a worker may take to /health 200 (60)"),
        },
        flags=(BROKERS,),
        bootstrap=False,
    ),
    Bench(
        "eos",
        with_bench_limits(cmd_bench_eos),
        help="Faust exactly_once against at_least_once: events/s, and duplicates after kill -9",
        description="On an embedded Apache Kafka, run a minimal Faust app (a RocksDB table "
        "counting per key, one output record per event) over --events pre-produced events "
        "with processing_guarantee at_least_once and exactly_once: events/s of each and their "
        "ratio; then kill -9 the worker --kills times per guarantee, restart it, and count "
        "duplicate and lost output records (read_committed) and wrong table counts.",
        sizes={
            "events": (50_000, "pre-produced events per phase (50000)"),
            "kills": (3, "kill -9 and restart of the worker per guarantee (3)"),
        },
        bootstrap=False,
    ),
    Bench(
        "adtext",
        with_bench_limits(cmd_bench_adtext),
        help="ads with text alone: publish -> servable latency, bare encoder as baseline",
        description="One worker with the text encoder (ADPULSE_TEXT_MODEL, else the cached "
        "export, built first if missing) on CPU; new ads, each with its own text, are "
        "published at --rate/s for --duration s, and each is timed from its send until "
        "POST /decide with it as the only candidate chooses it (target p99 <= 1 s at 100/s). "
        "Baseline in the same run: the bare encoder's texts/s, one by one and in batches.",
        sizes={
            "rate": (100.0, "new ads with text per second (100)"),
            "duration": (30.0, "seconds of publishing (30)"),
        },
    ),
    Bench(
        "catalog-join",
        with_bench_limits(cmd_bench_catalog_join),
        help="a second worker joins while the catalog loads: does every worker get every ad?",
        description="On an embedded Apache Kafka, per trial: publish --ads ads, start worker A, "
        "--delay seconds later worker B in the same new group; report each worker's "
        "adpulse_catalog_ads once settled and the distinct ads in the catalog changelog "
        "(read to its end). Reproduces Faust's GlobalTable losing changelog records across a "
        "rebalance (docs/reference.md, The embedded broker).",
        sizes={
            "trials": (6, "trials, each on new topics and a new group (6)"),
            "ads": (3000, "ads published before worker A starts (3000)"),
            "delay": (4.0, "seconds between worker A's and worker B's start (4.0)"),
        },
        json_help='also write {"catalog_join": figures} as JSON',
        bootstrap=False,
    ),
    Bench(
        "all",
        with_bench_limits(cmd_bench_all),
        help="every benchmark at its defaults, one JSON report and a Markdown table",
        description="Run bench features, decisions, state, mixed, rebalance and scorer at their "
        "defaults (or --smoke) on one broker, print each result line and a Markdown table of "
        "every target, the measured value and its same-run baseline, and write all figures to "
        "--json.",
        flags=(DATA,),
        json_help="also write every benchmark's figures as one JSON document",
    ),
)


def _add(bench: Subparsers, spec: Bench) -> None:
    p = add_command(bench, spec.name, spec.handler, help=spec.help, description=spec.description)
    for name, (default, help_) in spec.sizes.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                       help=help_)  # fmt: skip
    for flag, kwargs in spec.flags:
        p.add_argument(flag, **kwargs)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks it runs, not speed")
    json_help = spec.json_help or f'also write {{"{spec.name}": figures}} as JSON'
    p.add_argument("--json", metavar="PATH", help=json_help)
    if spec.bootstrap:
        add_bootstrap(p)


def register(sub: Subparsers) -> None:
    bench = add_group(
        sub,
        "bench",
        dest="bench",
        metavar="BENCH",
        help="benchmarks, each with its baseline measured in the same run",
        description="Benchmarks print medians with their spread and a baseline measured in "
        "the same run on the same messages (this machine is shared and noisy: compare ratios).",
    )
    for spec in BENCHES:
        _add(bench, spec)
    p = add_command(
        bench,
        "table",
        cmd_bench_table,
        help="the Markdown table of a bench all JSON (docs/performance.md's is made so)",
        description="Print the table of targets, measured values and same-run baselines of a "
        "JSON written by bench all --json; with --into, replace the generated table of that "
        "Markdown document with it.",
    )
    p.add_argument("--from", dest="source", metavar="JSON", required=True,
                   help="a JSON written by bench all --json")  # fmt: skip
    p.add_argument("--into", metavar="DOC", help="rewrite this document's generated table")
