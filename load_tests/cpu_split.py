"""Where each film's CPU goes in the running service: per process and per thread, under the benchmark's load.

    python -m load_tests.cpu_split [--count 300] [--concurrency 16] [--service-env KEY=VALUE ...]

`bench_service` gives films per second; this says what each film costs and where. It starts `bentoml serve`
(as bench_service does, on the same cached synthetic 1024² films), warms it with 64 films, then posts every film
once at the given concurrency and reads each server process's threads' CPU time (user + system, from
/proc/<pid>/task) before and after. Printed: films/s, the client's own CPU per film (it shares the cores),
each process's CPU per film, and its busiest threads' (the main thread runs the event loop: HTTP, JSON, the
middleware; the others are the edge's decode threads, ONNX Runtime's threads and the model worker's). On a
box with C cores, films/s can reach at most C x 1000 / (sum of the ms per film): that sum is the budget a
change has to shrink. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import psutil

from load_tests.bench_service import REPO, parse_env, post_all, synthetic_films

TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each live thread of `pid`."""
    seconds = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        seconds[int(tid)] = (int(fields[11]) + int(fields[12])) / TICKS
    return seconds


def server_processes(root: int) -> dict[int, str]:
    """The BentoML service processes below `root`, by pid: their service's name (ptx-triage, ptx-models)."""
    found = {}
    for child in psutil.Process(root).children(recursive=True):
        command = child.cmdline()
        if "--service-name" in command:
            found[child.pid] = command[command.index("--service-name") + 1]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="synthetic films posted once each")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=3, help="busiest threads shown per process")
    args = parser.parse_args(argv)
    from tests.servers import bento_server

    films = [(path.name, path.read_bytes()) for path in synthetic_films(args.count, 0, REPO / "data" / "bench")]
    out = REPO / "data" / "bench" / "runs" / time.strftime("cpu-split-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    started: list = []
    with bento_server(out / "service.log", parse_env(args.service_env), 180, started=started) as base:
        asyncio.run(post_all(base, films[:64], args.concurrency, "rle"))
        processes = server_processes(started[0].pid)
        before = {pid: thread_cpu(pid) for pid in processes}
        client_before = time.process_time()
        records, wall = asyncio.run(post_all(base, films, args.concurrency, "rle"))
        client = time.process_time() - client_before
        after = {pid: thread_cpu(pid) for pid in processes}
    ok = sum(record.status == 200 for record in records)
    if not ok:
        raise SystemExit(f"no film was answered 200 (see {out / 'service.log'})")
    per_film = 1000 / ok
    print(f"{ok}/{len(records)} answered in {wall:.1f} s = {ok / wall:.2f} films/s on {os.cpu_count()} CPUs; "
          f"service env {parse_env(args.service_env)}")
    total = client * per_film
    print(f"  client (this process)       {client * per_film:6.2f} ms per film")
    for pid, name in processes.items():
        spent = {tid: seconds - before[pid].get(tid, 0.0) for tid, seconds in after[pid].items()}
        total += sum(spent.values()) * per_film
        print(f"  {name:<27} {sum(spent.values()) * per_film:6.2f} ms per film")
        for tid, seconds in sorted(spent.items(), key=lambda item: -item[1])[:args.threads]:
            label = "main thread (event loop)" if tid == pid else f"thread {tid}"
            print(f"    {label:<25} {seconds * per_film:6.2f}")
    ceiling = (os.cpu_count() or 1) * 1000 / total
    print(f"  all                         {total:6.2f} ms per film: at most {ceiling:.1f} films/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
