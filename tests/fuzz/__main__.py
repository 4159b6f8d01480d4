"""The fuzzing run behind ``scripts/fuzz``: a budget of inputs spread over every target, on at
most two processes; a table per decoder, every foreign exception with reproducers, and a
non-zero exit status if there was any."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any

from .harness import Stats, fuzz, rate, run_one, targets

#: Inputs per task handed to a worker process.
BATCH = 5000


def _work(task: tuple[str, int, int, int]) -> Stats:
    name, seed, start, count = task
    return fuzz(targets()[name], count, seed, start)


def _tasks(names: list[str], total: int, seed: int, batch: int) -> list[tuple[str, int, int, int]]:
    """``total`` inputs spread evenly over ``names``, cut into batches, interleaved by target."""
    tasks = []
    for i, name in enumerate(names):
        share = total // len(names) + (1 if i < total % len(names) else 0)
        tasks += [(name, seed, start, min(batch, share - start)) for start in range(0, share, batch)]
    order = {name: i for i, name in enumerate(names)}
    return sorted(tasks, key=lambda t: (t[2], order[t[0]]))


def _run(names: list[str], total: int, seed: int, jobs: int, batch: int, progress: bool) -> tuple[Stats, float]:
    stats = Stats()
    tasks = _tasks(names, total, seed, batch)
    began = time.perf_counter()
    done = 0
    step = max(1, total // 10)
    mark = step

    def report(part: Stats) -> None:
        nonlocal done, mark
        stats.merge(part)
        done += sum(part.inputs.values())
        if progress and done >= mark:
            took = time.perf_counter() - began
            print(f"  {done}/{total} inputs, {took:.0f} s, {stats.foreign} foreign", file=sys.stderr, flush=True)
            mark += step

    if jobs <= 1:
        for task in tasks:
            report(_work(task))
    else:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        with context.Pool(jobs) as pool:
            for part in pool.imap_unordered(_work, tasks):
                report(part)
    return stats, time.perf_counter() - began


def _table(stats: Stats, names: list[str], wall: float, jobs: int) -> str:
    rows = [f"{'target':<22} {'inputs':>9} {'rejected':>9} {'foreign':>8} {'inputs/s':>9}  (per process)"]
    for name in names:
        foreign = sum(f.count for f in stats.findings.values() if f.target == name)
        rows.append(
            f"{name:<22} {stats.inputs.get(name, 0):>9} {stats.rejected.get(name, 0):>9} {foreign:>8}"
            f" {rate(stats, name):>9.0f}"
        )
    total = sum(stats.inputs.values())
    rows.append(
        f"{'total':<22} {total:>9} {sum(stats.rejected.values()):>9} {stats.foreign:>8}"
        f" {total / wall if wall else 0:>9.0f}  ({wall:.1f} s wall, {jobs} process(es))"
    )
    return "\n".join(rows)


def _as_json(stats: Stats, names: list[str], wall: float, jobs: int, seed: int) -> dict[str, Any]:
    total = sum(stats.inputs.values())
    return {
        "inputs": total,
        "seed": seed,
        "processes": jobs,
        "seconds": round(wall, 3),
        "inputs_per_second": round(total / wall, 1) if wall else None,
        "foreign": stats.foreign,
        "targets": {
            name: {
                "inputs": stats.inputs.get(name, 0),
                "rejected": stats.rejected.get(name, 0),
                "foreign": sum(f.count for f in stats.findings.values() if f.target == name),
                "inputs_per_second": round(rate(stats, name), 1),
                "doc": targets()[name].doc,
            }
            for name in names
        },
        "findings": [
            {
                "target": f.target,
                "type": f.type,
                "message": f.message,
                "where": f.where,
                "innermost": f.innermost,
                "count": f.count,
                "examples": [{"hex": e.data.hex(), "split_seed": e.split_seed} for e in f.examples],
            }
            for f in sorted(stats.findings.values(), key=lambda f: (f.target, -f.count))
        ],
        "slow": [
            {"target": t, "seconds": round(s, 3), "hex": e.data.hex(), "split_seed": e.split_seed}
            for t, s, e in stats.slow
        ],
    }


def _reproduce(name: str, hex_input: str, split_seed: int) -> int:
    target = targets()[name]
    if hex_input.startswith("@"):  # a file holding the hex (inputs too long for a command line)
        with open(hex_input[1:]) as f:
            hex_input = f.read()
    data = bytes.fromhex(hex_input.strip())
    exc = run_one(target, data, split_seed)
    if exc is None:
        print(f"{name}: {len(data)} bytes accepted or rejected as the decoder's own error (split seed {split_seed})")
        return 0
    traceback.print_exception(exc)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/fuzz", description=__doc__)
    parser.add_argument("--inputs", type=int, default=1_000_000, help="total inputs, spread over the targets")
    parser.add_argument("--seed", type=int, default=0, help="run seed (the same seed gives the same inputs)")
    parser.add_argument("--target", action="append", help="only this target (repeatable); see --list")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes (at most 2)")
    parser.add_argument("--batch", type=int, default=BATCH, help="inputs per task")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument(
        "--reproduce",
        nargs="+",
        metavar=("TARGET HEX", "SPLIT_SEED"),
        help="run one input (HEX, or @FILE holding it) and print its traceback",
    )
    args = parser.parse_args(argv)
    registry = targets()
    if args.list:
        for name, target in registry.items():
            print(f"{name:<22} {target.doc}")
        return 0
    if args.reproduce:
        if len(args.reproduce) not in (2, 3):
            parser.error("--reproduce TARGET HEX [SPLIT_SEED]")
        return _reproduce(
            args.reproduce[0], args.reproduce[1], int(args.reproduce[2]) if len(args.reproduce) > 2 else 0
        )
    names = args.target or list(registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; see --list")
    jobs = max(1, min(2, args.jobs))
    scratch = tempfile.mkdtemp(prefix="peerpath-fuzz-")
    os.environ["PEERPATH_FUZZ_TMP"] = scratch
    try:
        stats, wall = _run(names, args.inputs, args.seed, jobs, max(1, args.batch), progress=not args.json)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(_as_json(stats, names, wall, jobs, args.seed), indent=2))
    else:
        print(_table(stats, names, wall, jobs))
        findings = sorted(stats.findings.values(), key=lambda f: (f.target, -f.count))
        print(f"\n{len(findings)} distinct foreign exception(s), {stats.foreign} input(s)")
        for finding in findings:
            print()
            print(finding.describe())
        for name, seconds, example in stats.slow:
            print(
                f"\nslow input: {name} took {seconds:.2f} s: {example.data[:80].hex()}... ({len(example.data)} bytes)"
            )
    return 1 if stats.foreign else 0


if __name__ == "__main__":
    sys.exit(main())
