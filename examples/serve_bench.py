"""Load ``first-gguf serve`` with its default (FiRST) and with every layer (``full``), the same requests each.

    python examples/serve_bench.py [MODEL] [--requests 200] [--clients 8] [--max-tokens 6] [--threads 1]

Starts a server on a free loopback port, then sends the load in rounds that alternate the
two: ``first`` requests say nothing (the server's default: the file's default operating
point, else the routers), ``full`` requests ask ``first_mode: full``; so both see the same
machine. Prints requests/s, the clients' latency p50/p90/p99 (queueing included: the server
runs one request at a time), the server's own time per request and the layers skipped.
Needs the `server` and `test` extras (the clients are the openai package).
"""

from __future__ import annotations

import argparse

from first_gguf.serve_load import LoadResult, format_load, run_load, server_process

MODES = {"first": {}, "full": {"first_mode": "full"}}  # request bodies' FiRST fields per run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--requests", type=int, default=200, help="per mode")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two modes")
    args = ap.parse_args()
    results = {"first": LoadResult(), "full": LoadResult()}
    with server_process(args.model, threads=args.threads) as base:
        model_id = _served_id(base)
        run_load(base, model_id, n_requests=args.clients, concurrency=args.clients)  # warm-up, not counted
        for r in range(args.rounds):
            for mode in (("first", "full") if r % 2 == 0 else ("full", "first")):
                got = run_load(base, model_id, n_requests=args.requests // args.rounds, concurrency=args.clients,
                               max_tokens=args.max_tokens, extra=MODES[mode])
                results[mode] = results[mode].merge(got)
    print(f"{args.requests} requests per mode from {args.clients} clients, max_tokens {args.max_tokens}, "
          f"server threads {args.threads}, half streamed")
    print(format_load(results))


def _served_id(base: str) -> str:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{base}/models") as r:
        return json.loads(r.read())["data"][0]["id"]


if __name__ == "__main__":
    main()
