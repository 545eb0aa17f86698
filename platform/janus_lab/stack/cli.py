"""`python -m janus_lab.stack up|down|status` (what `make up`, `make down` and `make status` run)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from janus_lab.stack.local import ENV_OVERRIDES, LocalStack, PortInUseError, ServiceStatus


def print_status(stack: LocalStack, report: list[ServiceStatus]) -> None:
    rows = [("service", "state", "pid", "procs", "ports", "health")]
    for s in report:
        # gRPC ports are always HTTP + 1; leaving them out keeps the table readable.
        ports = " ".join(f"{role.removeprefix(s.name + ' ').replace(' ', '-')}:{port}"
                         for role, port in s.ports.items() if not role.endswith("gRPC"))
        state = "up" if s.up else ("unhealthy" if s.pid else "down")
        rows.append((s.name, state, str(s.pid or "-"), str(s.processes or "-"), ports, s.health))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    print(f"run dir: {stack.run_dir}")
    if stack.env_file.exists():
        print(f"client environment: source {stack.env_file}")


def main(argv: list[str] | None = None) -> int:
    """Returns the exit code: 0 on success, 1 when `up` fails."""
    parser = argparse.ArgumentParser(prog="python -m janus_lab.stack",
                                     description="Local stack: SeaweedFS S3 + MLflow + Ray head. Ports: "
                                     + ", ".join(ENV_OVERRIDES))
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="data, logs, PID files and env.sh (default: $JANUS_STACK_DIR or <repo>/run/stack)")
    parser.add_argument("--no-ray", action="store_true", help="without the Ray head (S3 + MLflow only)")
    args = parser.parse_args(argv)
    stack = LocalStack.for_run_dir(args.run_dir, with_ray=not args.no_ray)
    began = time.monotonic()
    if args.command == "up":
        try:
            stack.up()
        except (PortInUseError, RuntimeError, TimeoutError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"up in {time.monotonic() - began:.1f}s")
        print_status(stack, stack.status())
    elif args.command == "down":
        stopped = stack.down()
        print(f"stopped {', '.join(stopped)} in {time.monotonic() - began:.1f}s" if stopped else "nothing was running")
    else:
        print_status(stack, stack.status())
    return 0
