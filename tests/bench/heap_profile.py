"""Where the operator's memory goes after its initial burst (docs/performance.md, "Memory per
binding"): N client-credentials bindings made Ready from a start, as the scale benchmark does
(tests/bench/bench.py), with the operator run under heaptrack. Once all are Ready and 15 s have
passed, its RSS is read and it is killed with SIGKILL (nothing is freed at a shutdown), so that
heaptrack's "leaked" figures are what was live at that moment. Prints heaptrack_print's summary
(by allocation site) and the RSS figures; the profile stays in --out.

    eval "$(scripts/tools.sh)"; export KUBE_BIN_DIR=$(tests/e2e/build-kube.sh)
    cargo build --bin mail-oauth-operator        # a debug build: symbols for the call sites
    OPERATOR_BIN=$CARGO_TARGET_DIR/debug/mail-oauth-operator \
      python3 tests/bench/heap_profile.py --bindings 2000 --out /tmp/heap

With --no-heaptrack the operator runs alone: the same RSS figures without the profiler.
"""
import argparse
import os
import shutil
import signal
import stat
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import ROOT, Run, proc_status  # noqa: E402
from bed import OPERATOR_NAMESPACE, Bed, wait_for  # noqa: E402


def descendants(pid):
    """`pid` and every process below it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            todo.extend(int(c) for c in children)
    return out


def operator_pid(pid, binary):
    """The operator's own process under the wrapper and heaptrack's shell script."""
    for p in descendants(pid):
        try:
            if os.readlink(f"/proc/{p}/exe") == str(binary):
                return p
        except OSError:
            pass
    raise RuntimeError("operator process not found")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bindings", type=int, default=2000)
    p.add_argument("--out", default="/tmp/heap-profile")
    p.add_argument("--no-heaptrack", action="store_true")
    p.add_argument("--settle", type=int, default=15)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    real = Path(os.environ["OPERATOR_BIN"]).resolve()
    if not args.no_heaptrack:
        # The bed starts OPERATOR_BIN as the chart's Deployment would: a wrapper under heaptrack.
        wrapper = out / "operator-under-heaptrack"
        wrapper.write_text(f'#!/bin/sh\nexec heaptrack -o "{out}/heaptrack.$$" "{real}" "$@"\n')
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
        os.environ["OPERATOR_BIN"] = str(wrapper)
    bed = Bed()

    def stop_operator(name="operator"):
        # heaptrack's script does not pass SIGTERM on: the whole group, as the kubelet would.
        proc = bed.procs.pop(name)
        os.killpg(proc.pid, signal.SIGTERM)
        return proc.wait(timeout=60)

    bed.stop_operator = stop_operator
    run = Run(bed, argparse.Namespace(concurrency=16, api_qps=1000, latency_ms=0))
    report = {"bindings": args.bindings}
    try:
        bed.certificates()
        bed.start_etcd()
        bed.start_apiserver()
        bed.kubectl("apply", "-f", str(ROOT / "crds"))
        bed.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        bed.kubectl("create", "namespace", OPERATOR_NAMESPACE)
        run.start_token_server()
        bed.kubectl("create", "namespace", "empty")
        pid = operator_pid(run.start_operator("empty"), real)
        time.sleep(5)
        report["rss_idle_baseline_mib"] = round(proc_status(pid, "VmRSS") / 2**20, 1)
        bed.stop_operator()
        ns = "heap"
        run.create(ns, args.bindings, provider_ready=True)
        for old in out.glob("heaptrack.*"):
            old.unlink()
        pid = operator_pid(run.start_operator(ns, "--provider-token-rate", "10000"), real)
        started = time.monotonic()
        wait_for("all bindings Ready", lambda: run.ready_count() >= args.bindings,
                 timeout=max(300, args.bindings / 2), interval=0.25)
        report["all_ready_s"] = round(time.monotonic() - started, 1)
        time.sleep(args.settle)
        report["rss_steady_mib"] = round(proc_status(pid, "VmRSS") / 2**20, 1)
        report["rss_peak_mib"] = round(proc_status(pid, "VmHWM") / 2**20, 1)
        report["rss_per_binding_kib"] = round(
            (report["rss_steady_mib"] - report["rss_idle_baseline_mib"]) * 1024 / args.bindings, 2)
        os.kill(pid, signal.SIGKILL)
        bed.procs["operator"].wait(timeout=120)
        bed.procs.pop("operator")
    except BaseException:
        bed.dump_logs(20)
        raise
    finally:
        bed.down()
        shutil.rmtree(bed.dir, ignore_errors=True)
    print(report)
    (out / "report.txt").write_text(f"{report}\n")


if __name__ == "__main__":
    main()
