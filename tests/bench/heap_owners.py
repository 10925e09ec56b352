"""Attributes the bytes live in a heap profile to their owners in the operator (docs/heap-profile.md):
the caches (kube's reflector stores, the owned-Secret cache), kube-runtime's scheduler and
predicate filter, the contexts' maps, HTTP connections and so on, by the call sites that allocated
them. Input: heaptrack's stacks of still-live bytes, e.g. of tests/bench/heap_profile.py's profile:

    heaptrack_print -f heaptrack.N.zst --flamegraph-cost-type leaked -F leaked.stacks
    python3 tests/bench/heap_owners.py leaked.stacks BINDINGS [CALL-SITES-PER-OWNER]
"""
import collections
import re
import sys

# (a frame's text, the owner): the first frame from the allocation upwards that names one decides,
# so a map's insert is its owner's (a store's, the scheduler's), not hashbrown's.
RULES = [
    ("Context::wrote_status", "context: written (status resourceVersions)"),
    ("OwnWrites", "context: own_writes"),
    ("SecretVersions", "context: referable versions"),
    ("controller::verify", "verifier"),
    ("mail_oauth_operator::metrics", "metrics"),
    ("apply_watcher_event", "STORE"),
    ("PredicateFilter", "binding predicate cache (generation+annotations hashes)"),
    ("kube_runtime::scheduler", "controller scheduler (DelayQueue + map)"),
    ("kube_runtime::controller", "controller runner/trigger"),
    ("tokio::sync::mpsc", "tokio mpsc channel blocks"),
    ("async_broadcast", "shared reflector broadcast"),
    ("tokio_util::time", "tokio_util delay queue"),
    ("rustls", "http: TLS"),
    ("hyper", "http: hyper"),
    ("h2::", "http: h2"),
    ("reqwest", "http: reqwest"),
    ("serde_json", "watch decode buffers"),
    ("kube_runtime::watcher", "watcher state"),
    ("kube_client", "kube client"),
    ("tracing", "tracing"),
]
OWNED = "owned Secrets cache (compact JSON)"
SHOWN = ("mail_oauth", "kube_runtime", "k8s_openapi", "Clone", "hashbrown::map", "String", "BTreeMap", "serde",
         "tokio", "hyper", "rustls", "bytes")


def short(frame):
    """A frame without its symbol hash and file, with the mangled punctuation restored."""
    frame = re.sub(r"::h[0-9a-f]{16}", "", frame)
    for mangled, plain in (("$LT$", "<"), ("$GT$", ">"), ("$u20$", " "), ("$u7b$", "{"), ("$u7d$", "}"),
                           ("$C$", ","), ("$RF$", "&"), ("..", "::")):
        frame = frame.replace(mangled, plain)
    return re.sub(r" \([^)]*\)$", "", frame)


def owner(frames):
    for frame in reversed(frames):
        if "OwnedSecrets" in frame:
            return OWNED
        for text, name in RULES:
            if text in frame:
                if name != "STORE":
                    return name
                # Which reflector: told apart by the streams polling it (runtime.rs).
                stack = ";".join(frames)
                if "PredicateFilter" in stack:
                    return "store: MailboxBinding"
                if "filter_map::FilterMap" in stack:
                    return "store: owned Secrets metadata"
                return "store: providers/other"
    if any("mail_oauth_operator" in frame for frame in frames):
        return "operator other"
    return "other"


def main():
    owners, sites = collections.Counter(), collections.defaultdict(collections.Counter)
    with open(sys.argv[1]) as stacks:
        for line in stacks:
            path, _, count = line.rstrip("\n").rpartition(" ")
            if not int(count):
                continue
            frames = [short(f) for f in path.split(";")]
            who = owner(frames)
            owners[who] += int(count)
            shown = [f for f in frames if any(k in f for k in SHOWN)]
            sites[who][" <- ".join(reversed(shown[-4:]))] += int(count)
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    total = sum(owners.values())
    print(f"total live {total} bytes; per binding {total / n:.0f}")
    for who, count in owners.most_common():
        print(f"{count:>10} {100 * count / total:5.1f}%  {count / n:7.0f} B/binding  {who}")
    if len(sys.argv) > 3:
        for who, _ in owners.most_common():
            print("\n##", who)
            for site, count in sites[who].most_common(int(sys.argv[3])):
                print(f"   {count:>9}  {site[:300]}")


if __name__ == "__main__":
    main()
