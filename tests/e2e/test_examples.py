"""Every file in examples/ applies on its own, for real, to a real kube-apiserver (issue 17): each
in a fresh namespace of its own (the file's namespace replaced), with the CRDs installed and
nothing else. Once applied, everything it references must exist: the provider a binding names
(a MailProvider of the binding's namespace, or a ClusterMailProvider), every Secret a provider
or binding names (a ClusterMailProvider's in the operator's namespace), and every Secret a pod
mounts (it must be the one a binding in the same file publishes, or one the file defines, such as
a relay's TLS certificate). `kubectl apply --dry-run=server`
could not show a missing object: the objects are created. No two examples define the same object
or publish the same Secret, so applying them all together does not make one overwrite another.

One bed for all (etcd and kube-apiserver only: no operator is needed to see what exists)."""
import copy
import glob
import os

import pytest
import yaml
from bed import OPERATOR_NAMESPACE, ROOT, Bed

EXAMPLES = sorted(glob.glob(str(ROOT / "examples" / "*.yaml")))
CLUSTER_SCOPED = {"ClusterMailProvider", "Namespace", "CustomResourceDefinition", "ClusterRole",
                  "ClusterRoleBinding"}


def documents(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


@pytest.fixture(scope="module")
def bed(request):
    b = Bed()
    try:
        b.certificates()
        b.start_etcd()
        b.start_apiserver()
        b.kubectl("apply", "-f", str(ROOT / "crds"))
        b.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        b.kubectl("create", "namespace", OPERATOR_NAMESPACE)
    except BaseException:
        b.dump_logs()
        b.down()
        raise
    yield b
    if request.session.testsfailed:
        b.dump_logs(40)
    b.down()


def in_fresh_namespace(docs, namespace):
    """The file's objects, moved to `namespace`; a ClusterMailProvider's Secrets stay in the
    operator's namespace (where a ClusterMailProvider's Secrets must live), and cluster-scoped
    objects get a name of their own so that files do not meet through them."""
    out = []
    for d in copy.deepcopy(docs):
        meta = d.setdefault("metadata", {})
        if d["kind"] in CLUSTER_SCOPED:
            meta["name"] = f"{namespace}-{meta['name']}"
        elif meta.get("namespace") != OPERATOR_NAMESPACE:
            meta["namespace"] = namespace
        out.append(d)
    renamed = {d["metadata"]["name"].removeprefix(f"{namespace}-"): d["metadata"]["name"]
               for d in out if d["kind"] == "ClusterMailProvider"}
    for d in out:
        ref = (d.get("spec") or {}).get("providerRef") if d["kind"] == "MailboxBinding" else None
        if ref and ref.get("kind") == "ClusterMailProvider" and ref["name"] in renamed:
            ref["name"] = renamed[ref["name"]]
    return out


def references(docs):
    """(kind, namespace or None, name, why) of everything the objects name and need."""
    published = {(d["metadata"]["namespace"], d["spec"]["secretName"]) for d in docs if d["kind"] == "MailboxBinding"}
    defined = {(d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs if d["kind"] == "Secret"}
    refs = []
    for d in docs:
        kind, meta, spec = d["kind"], d["metadata"], d.get("spec") or {}
        ns = meta.get("namespace")
        if kind in ("MailProvider", "ClusterMailProvider"):
            secret_ns = OPERATOR_NAMESPACE if kind == "ClusterMailProvider" else ns
            auth = spec.get("clientAuthentication") or {}
            for r in auth.get("clientSecretRefs", []):
                refs.append(("Secret", secret_ns, r["name"], f"{kind} {meta['name']} clientSecretRefs"))
            if auth.get("certificateRef"):
                refs.append(("Secret", secret_ns, auth["certificateRef"]["name"], f"{kind} {meta['name']} certificateRef"))
            if spec.get("serviceAccountKeyRef"):
                refs.append(("Secret", secret_ns, spec["serviceAccountKeyRef"]["name"],
                             f"{kind} {meta['name']} serviceAccountKeyRef"))
        elif kind == "MailboxBinding":
            ref = spec["providerRef"]
            pkind = ref.get("kind", "MailProvider")
            refs.append((pkind, ns if pkind == "MailProvider" else None, ref["name"], f"binding {meta['name']} providerRef"))
            import_ref = (spec["grant"].get("refreshToken") or {}).get("secretRef")
            if import_ref:
                refs.append(("Secret", ns, import_ref["name"], f"binding {meta['name']} refreshToken.secretRef"))
        elif kind in ("Deployment", "Pod"):
            pod = d["spec"]["template"]["spec"] if kind == "Deployment" else d["spec"]
            for v in pod.get("volumes", []):
                if "secret" in v:
                    name = v["secret"]["secretName"]
                    assert (ns, name) in published | defined, \
                        f"{kind} {meta['name']} mounts Secret {name}, which no binding of this file publishes and the file does not define"
    return refs


def exists(bed, kind, namespace, name):
    args = ["get", kind.lower(), name, "-o", "name"] + (["-n", namespace] if namespace else [])
    return bed.kubectl(*args, check=False).returncode == 0


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_an_example_applies_on_its_own_and_everything_it_references_exists(bed, path):
    name = os.path.basename(path).removesuffix(".yaml")
    namespace = f"ex-{name}"
    bed.kubectl("create", "namespace", namespace)
    docs = in_fresh_namespace(documents(path), namespace)
    bed.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    missing = [f"{kind} {ns + '/' if ns else ''}{obj} ({why})"
               for kind, ns, obj, why in references(docs) if not exists(bed, kind, ns, obj)]
    assert not missing, f"{os.path.basename(path)} applied on its own references what it does not define: {missing}"
    for d in docs:
        meta = d["metadata"]
        assert exists(bed, d["kind"], meta.get("namespace") if d["kind"] not in CLUSTER_SCOPED else None, meta["name"])


def test_no_two_examples_define_the_same_object_or_publish_the_same_secret():
    seen = {}
    clashes = []
    for path in EXAMPLES:
        docs = documents(path)
        ids = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs}
        ids |= {("Secret", d["metadata"]["namespace"], d["spec"]["secretName"]) for d in docs
                if d["kind"] == "MailboxBinding"}
        for key in ids:
            if key in seen:
                clashes.append(f"{key} in {os.path.basename(seen[key])} and {os.path.basename(path)}")
            seen[key] = path
    assert not clashes, clashes


def test_the_check_sees_a_missing_reference():
    """The check itself: a binding whose provider and import Secret are absent is caught."""
    docs = [{"apiVersion": "mailoauth.io/v1alpha1", "kind": "MailboxBinding",
             "metadata": {"name": "b", "namespace": "n"},
             "spec": {"providerRef": {"name": "nowhere"}, "grant": {"refreshToken": {"secretRef": {"name": "gone"}}},
                      "secretName": "s"}}]
    refs = {(k, n) for k, _, n, _ in references(docs)}
    assert refs == {("MailProvider", "nowhere"), ("Secret", "gone")}
    with pytest.raises(AssertionError):
        references(docs + [{"kind": "Deployment", "metadata": {"name": "d", "namespace": "n"},
                            "spec": {"template": {"spec": {"volumes": [{"name": "v", "secret": {"secretName": "other"}}]}}}}])
